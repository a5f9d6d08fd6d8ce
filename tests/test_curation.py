"""Self-curation read from probabilities: each engine's logprob_of_continuations against the sums the
model itself gives (and score_nll's), the rubric rater's calibrated expected score, the likelihood
rater on SmolLM2-135M, selection by rank, the control set's AUC, and a round whose rater fails its
control adding no augmented data."""

import math

import numpy as np
import pytest
import torch
from aiohttp import web

from services.api import generator_pb2
from services.common.engines import create_engine
from services.common.engines.base import continuation_tokens
from services.common.formats import load_seed_tasks
from services.common.records import Instance, TaskRecord
from services.common.rendering import IGNORE_INDEX, NO_LIMIT, Example, tokenize
from services.generator import backtranslation as bt
from tests.loopback import LoopbackServer

PROMPT = "Task: Name a colour.\nAnswer: Score: "
CONTINUATIONS = ["1", "5", " blue and red", "Blue, and a long tail of further words.", ""]


def _token_logprobs(model, ids: list[int]) -> list[float | None]:
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return [None] + [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]


def _labelled(labels: list[int], logprobs: list[float | None]) -> float:
    return sum(lp for lp, label in zip(logprobs, labels) if label != IGNORE_INDEX and lp is not None)


@pytest.fixture(scope="module")
def tiny_llama(builtin_cache):
    engine = create_engine("hf", cache_dir=builtin_cache)
    engine.load("builtin:tiny-llama")
    return engine


def test_hf_logprobs_are_score_nll_without_eos(tiny_llama):
    """The shared-prefix cache gives the sums of one full forward pass; with EOS's log-prob added they
    are score_nll's total (mean NLL times the labelled tokens)."""
    engine = tiny_llama
    got = engine.logprob_of_continuations(PROMPT, CONTINUATIONS)
    for continuation, value in zip(CONTINUATIONS, got):
        f = continuation_tokens(engine.tokenizer, PROMPT, continuation)
        assert value == pytest.approx(_labelled(f["labels"], _token_logprobs(engine.model, f["input_ids"])), abs=1e-4)
        full = tokenize(Example(PROMPT, continuation, "", ""), engine.tokenizer, NO_LIMIT, False)
        assert full["input_ids"][:-1] == f["input_ids"] and full["input_ids"][-1] == engine.tokenizer.eos_token_id
        eos = _token_logprobs(engine.model, full["input_ids"])[-1]
        labelled = sum(1 for label in full["labels"] if label != IGNORE_INDEX)
        nll = engine.score_nll([PROMPT], [continuation])[0]
        assert -(value + eos) == pytest.approx(nll * labelled, rel=1e-4)
    assert got[-1] == 0.0 and got[2] < got[0]  # nothing to score; more tokens, less probability


def test_hf_logprobs_encoder_decoder(builtin_cache):
    engine = create_engine("hf", cache_dir=builtin_cache)
    engine.load("builtin:tiny-t5")
    got = engine.logprob_of_continuations(PROMPT, CONTINUATIONS[:3])
    for continuation, value in zip(CONTINUATIONS[:3], got):
        f = tokenize(Example(PROMPT, continuation, "", ""), engine.tokenizer, NO_LIMIT, True)
        labelled = len(f["labels"])  # the target and its EOS
        with torch.no_grad():
            out = engine.model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]]))
        eos = torch.log_softmax(out.logits[0, -1].float(), -1)[engine.tokenizer.eos_token_id].item()
        assert -(value + eos) == pytest.approx(float(out.loss) * labelled, rel=1e-4)


class _EchoServer(LoopbackServer):
    """What vLLM's OpenAI server answers to echo + logprobs on token-id prompts, from a transformers model."""

    def __init__(self, model):
        self.model, self.bodies = model, []

    async def completions(self, request):
        body = await request.json()
        self.bodies.append(body)
        logprobs = {"token_logprobs": _token_logprobs(self.model, body["prompt"])}
        return web.json_response({"choices": [{"text": "", "finish_reason": "length", "logprobs": logprobs}]})


def test_openai_logprobs_match_the_hf_engine(tiny_llama, builtin_cache):
    with _EchoServer(tiny_llama.model) as server:
        engine = create_engine("openai", base_url=f"http://127.0.0.1:{server.port}/v1", cache_dir=builtin_cache)
        engine.load("builtin:tiny-llama")
        got = engine.logprob_of_continuations(PROMPT, CONTINUATIONS)
    assert got == pytest.approx(tiny_llama.logprob_of_continuations(PROMPT, CONTINUATIONS), abs=1e-4)
    assert all(b["echo"] and b["max_tokens"] == 1 for b in server.bodies)
    assert server.bodies[0]["prompt"] == continuation_tokens(tiny_llama.tokenizer, PROMPT, "1")["input_ids"]


class _TopLogprobsServer(LoopbackServer):
    """A hosted model: text prompts, the first token's top log-probs, no echo."""

    def __init__(self, top):
        self.top, self.bodies = top, []

    async def completions(self, request):
        self.bodies.append(await request.json())
        logprobs = {"tokens": ["5"], "token_logprobs": [-0.5], "top_logprobs": [self.top]}
        return web.json_response({"choices": [{"text": "5", "finish_reason": "length", "logprobs": logprobs}]})


def test_openai_remote_model_reads_the_top_logprobs():
    top = {"5": -0.5, " 5": -2.0, "4": -1.5, "3": -3.0, "\n": -4.0}
    with _TopLogprobsServer(top) as server:
        engine = create_engine("openai", base_url=f"http://127.0.0.1:{server.port}/v1", backoff_s=0.01)
        engine.load("gpt-hosted")
        got = engine.logprob_of_continuations("rate it: Score: ", list(bt.SCORE_TOKENS))
    assert server.bodies[0]["prompt"] == "rate it: Score: " and server.bodies[0]["logprobs"] == 5
    assert got[4] == pytest.approx(math.log(math.exp(-0.5) + math.exp(-2.0)))  # "5" and " 5" are one answer
    assert got[3] == -1.5 and got[2] == -3.0
    assert got[0] == got[1] == -4.0  # not listed: the lowest listed log-prob, an upper bound


class _BiasedEngine:
    """Log-probs of "1".."5": the content-free prompt prefers "5" strongly; a real pair a little less."""

    tokenizer = None

    def logprob_of_continuations(self, prompt, continuations):
        content_free = "<answer>\nN/A\n</answer>" in prompt
        weights = [1, 1, 1, 2, 16] if content_free else [1, 1, 2, 4, 16]
        return [math.log(w / sum(weights)) for w in weights]


def test_rubric_calibration_divides_out_the_content_free_distribution():
    from services.common.rendering import Renderer

    ((calibrated, raw),) = bt.rubric_ratings(_BiasedEngine(), Renderer(), [bt.Pair("Name a colour.", "Blue.")])
    assert raw == pytest.approx((1 + 2 + 2 * 3 + 4 * 4 + 16 * 5) / 24)
    ratio = [1, 1, 2, 2, 1]  # p / p_cf, renormalised: the bias towards "5" is gone
    assert calibrated == pytest.approx(sum((s + 1) * r for s, r in enumerate(ratio)) / sum(ratio))
    assert calibrated < raw


# Pairs whose match SmolLM2 cannot miss, each with its shuffled twin (another pair's instruction).
OBVIOUS = [
    ("Name the three primary colours.", "Red, blue and yellow."),
    ("Translate 'good morning' into French.", "Bonjour."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
]


def _twins(n: int) -> list[TaskRecord]:
    """n matched pairs, then their shuffled twins (the next pair's instruction)."""
    return [
        TaskRecord(id=f"{kind}-{i}", instruction=OBVIOUS[(i + shift) % n][0], instances=[Instance("", response)])
        for kind, shift in (("matched", 0), ("shuffled", 1))
        for i, (_, response) in enumerate(OBVIOUS[:n])
    ]


def test_rubric_rater_reads_every_pair(tiny_llama, smollm2, builtin_cache):
    smol = create_engine("hf", cache_dir=builtin_cache)
    smol.load(smollm2)
    for engine, prompt_format in ((tiny_llama, "plain"), (smol, "chat")):
        ratings = bt.rate(engine, _twins(2)[:3], "rubric", prompt_format)
        assert all(1.0 <= r["curation"] <= 5.0 and 1.0 <= r["curation_uncalibrated"] <= 5.0 for r in ratings)
        assert len({r["curation"] for r in ratings}) == 3  # each pair its own figure, not a constant


def test_likelihood_rater_ranks_a_matched_pair_above_its_shuffled_twin(smollm2, builtin_cache):
    engine = create_engine("hf", cache_dir=builtin_cache)
    engine.load(smollm2)
    ratings = bt.rate(engine, _twins(3), "likelihood", "chat")
    matched, shuffled = ratings[:3], ratings[3:]
    for m, s in zip(matched, shuffled):
        assert m["curation_pmi"] > s["curation_pmi"] and m["curation"] > s["curation"]
    assert all(m["curation_pmi"] > 0 for m in matched)  # the instruction explains its own response


def test_selection_by_threshold_or_rank():
    scores = [4.25, 3.1, 5.0, 2.0, 0.0, 3.1, 1.5, 2.2]
    assert bt.selection_threshold(scores, "rubric", 5, 0.25) == ("threshold", 5.0)  # Humpback: some pair is a 5
    below = [s for s in scores if s < 5]
    mode, cutoff = bt.selection_threshold(below, "rubric", 5, 0.25)  # none reaches k: the best 2 of 7
    assert mode == "rank" and [s for s in below if s >= cutoff] == [4.25, 3.1, 3.1]  # ties at the cut-off stay
    mode, cutoff = bt.selection_threshold(scores, "likelihood", 5, 0.25)  # PMI: always by rank
    assert mode == "rank" and sorted(s for s in scores if s >= cutoff) == [4.25, 5.0]
    # the filter's min_curation_score is a float32: the cut-off still keeps the pair it was taken from
    assert float(np.float32(cutoff)) <= 4.25 and float(np.float32(cutoff)) > 4.2499
    assert bt.selection_threshold([0.0, 0.0], "likelihood", 5, 0.5)[1] == 5.0  # nothing readable: none kept


def test_rater_auc():
    assert bt.rater_auc([3, 4], [1, 2]) == 1.0 and bt.rater_auc([1, 2], [3, 4]) == 0.0
    assert bt.rater_auc([2, 2], [2, 2]) == 0.5  # a rater that tells nothing apart
    assert bt.rater_auc([3, 1], [2]) == 0.5 and bt.rater_auc([], [1]) is None


def test_control_pairs_are_matched_and_shuffled_twins():
    seeds = load_seed_tasks()
    pairs = bt.control_pairs(seeds, 6, seed=3)
    matched = [t for t in pairs if t.lineage.scores["matched"] == 1.0]
    shuffled = [t for t in pairs if t.lineage.scores["matched"] == 0.0]
    assert len(matched) == len(shuffled) == 6
    by_id = {t.id: t for t in seeds}
    for m, s in zip(matched, shuffled):
        source = by_id[m.lineage.parent_id]
        assert (m.instruction, m.instances[0]) == (source.instruction, source.instances[0])
        assert s.instances[0].output == source.instances[0].output and s.instruction != source.instruction
    assert not any(by_id[m.lineage.parent_id].is_classification for m in matched)  # prose first
    assert bt.control_pairs(seeds, 6, seed=3) == pairs and bt.control_pairs(seeds[:1], 6, seed=3) == []


def test_the_curation_request_names_its_rater(tmp_path, monkeypatch):
    from tests.test_driver import InProcessClients, ScriptedEngine, _settings

    clients = InProcessClients(_settings(str(tmp_path / "store")), ScriptedEngine(), monkeypatch)
    tasks = [TaskRecord(id="t", instruction="Say hi.", instances=[Instance("", "Hi!")])]
    from services.common.convert import tasks_to_source

    request = generator_pb2.CurateExamplesRequest(
        context={"run_id": "r"}, model_uri="scripted-base", tasks=tasks_to_source(tasks), rater="vibes"
    )
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT: rater"):
        clients.curate_examples(request)
    request.rater = ""  # unset: the config's default rater
    (rated,) = clients.curate_examples(request).tasks
    assert "curation_pmi" in rated.lineage.scores


def _loop(tmp_path, monkeypatch, engine):
    from ray_jobs.self_improve import LoopDriver
    from services.common.config import parse_config
    from tests.test_driver import InProcessClients, _settings

    settings = _settings(str(tmp_path / "store"))
    clients = InProcessClients(settings, engine, monkeypatch)
    return LoopDriver(parse_config(settings), clients, "r").run()["rounds"]


def _rater_engine(informative: bool):
    from tests.test_driver import REFERENCES, ScriptedEngine

    class Rater(ScriptedEngine):
        """A response is likelier after its own seed instruction (informative), or after any (not)."""

        def score_nll(self, prompts, responses, max_len=0):
            own = [REFERENCES.get(p.split("\n\n")[0].strip()) == r.strip() for p, r in zip(prompts, responses)]
            return [0.5 if informative and o else 1.0 for o in own]

    return Rater()


def test_a_round_whose_rater_fails_its_control_adds_no_augmented_data(tmp_path, monkeypatch, caplog):
    rounds = _loop(tmp_path / "blind", monkeypatch, _rater_engine(informative=False))
    for k in ("1", "2"):
        control, kept = rounds[k]["stages"]["curation_control"], rounds[k]["stages"]["filter_augmented"]
        assert control["auc"] == 0.5 and control["matched"] == control["shuffled"] > 0
        assert (kept["rater_auc"], kept["selection"], kept["kept_count"]) == (0.5, "rater_below_floor", 0)
        assert kept["candidates"] > 0 and rounds[k]["stages"]["train_data"]["augmented"] == 0
    assert "below backtranslation.min_rater_auc" in caplog.text

    rounds = _loop(tmp_path / "seeing", monkeypatch, _rater_engine(informative=True))
    for k in ("1", "2"):
        kept = rounds[k]["stages"]["filter_augmented"]
        assert (rounds[k]["stages"]["curation_control"]["auc"], kept["rater"], kept["selection"]) == (
            1.0,
            "likelihood",
            "rank",
        )
        assert kept["kept_count"] > 0  # every pair's PMI ties here, so the cut-off keeps them all
    assert rounds["2"]["stages"]["train_data"]["augmented"] == rounds["2"]["stages"]["filter_augmented"]["kept_count"]
