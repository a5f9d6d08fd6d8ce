from pathlib import Path

import pytest

from services.common.config import ConfigError, ReinstructConfig, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def test_defaults_in_one_place():
    config = load_config(None)
    assert config == ReinstructConfig()
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
