"""How a model sees its text: one renderer and one tokenization rule for every stage and engine.

Training, evaluation, the OpenAI chat endpoint and every engine (hf, vllm, openai) render a task
here and turn text into token ids here, so the gate measures the model that was trained:
- Format: the tokenizer's chat template for chat models, or reinstruct's plain instruction
  templates, chosen once by `model.prompt_format` (auto: chat when the tokenizer has a template).
  Backtranslated data keeps its tag either way (plain: a first line; chat: the system message),
  and so does every other task when a seed tag is set (training and evaluation alike), as Humpback
  told its two data sources apart with two system prompts.
- Special tokens: text is always encoded with add_special_tokens=False; the tokens the tokenizer
  would put before any text (BOS, for Llama-style tokenizers) are added explicitly unless the
  rendered text already starts with them (chat templates often write BOS). Encoder-decoder models
  get EOS after the prompt, in training and at inference alike.
- Truncation: a prompt keeps its last `max_len` tokens (the instruction's end and the answer cue);
  the BOS prefix is never cut.
- Labels (decoder-only): the whole text is tokenized once and the prompt/response boundary found by
  character offsets, so the loss covers exactly the response tokens the model sees, plus EOS.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

from . import prompts
from .config import ModelConfig, TrainingConfig
from .records import Instance, TaskRecord

IGNORE_INDEX = -100
NO_LIMIT = 1 << 30  # max_len for "no truncation"
PromptFormat = Literal["auto", "chat", "plain"]
DEFAULT_PROMPT_FORMAT: PromptFormat = ModelConfig().prompt_format  # the config's, never a second one
_TRAINING = TrainingConfig()


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    task_id: str
    template_id: str


@dataclass(frozen=True)
class Renderer:
    """Renders (task, instance) pairs as prompts. chat_tokenizer None: the plain templates."""

    chat_tokenizer: Any = None
    augmented_tag: str = ""
    seed_tag: str = ""  # every other instruction task, in training and evaluation alike

    @classmethod
    def for_tokenizer(
        cls,
        tokenizer,
        prompt_format: PromptFormat = DEFAULT_PROMPT_FORMAT,
        augmented_tag: str = "",
        seed_tag: str = "",
    ) -> Renderer:
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if prompt_format == "chat" and not has_template:
            raise ValueError("model.prompt_format is 'chat' but the model's tokenizer has no chat template")
        use_chat = prompt_format == "chat" or (prompt_format == "auto" and has_template)
        return cls(tokenizer if use_chat else None, augmented_tag, seed_tag)

    @property
    def style(self) -> str:
        return "chat" if self.chat_tokenizer is not None else "plain"

    @property
    def answer_ends(self) -> tuple[str, ...]:
        """Stop strings that end an answer as the format ends it: none for chat (the model's EOS),
        the plain templates' next part otherwise."""
        return () if self.chat_tokenizer is not None else prompts.PLAIN_ANSWER_ENDS

    def render(
        self, task: TaskRecord, instance: Instance, rng: random.Random | None = None, shots: list[Instance] = ()
    ) -> Example:
        """One of several templates (rng=None: the fixed evaluation template); `shots` are exemplars
        of the same task shown first (few-shot)."""
        if task.format == "raw":  # a meta-task prompt (Self-Instruct, rating): completion text as is
            return Example(task.instruction, instance.output, task.id, "raw")
        tag = self.augmented_tag if task.lineage.stage == "backtranslate" else self.seed_tag
        if self.chat_tokenizer is None:
            return self._plain(task, instance, rng, tag, shots)
        return self._chat(task, instance, rng, tag, shots)

    def _plain(self, task, instance, rng, tag, shots) -> Example:
        template = _pick(prompts.TRAIN_WITH_INPUT if instance.input.strip() else prompts.TRAIN_NO_INPUT, rng)
        prompt = "".join(f"{_fill(template, task, s)} {s.output.strip()}\n\n" for s in shots) + _fill(
            template, task, instance
        )
        prompt = f"{tag}\n{prompt}" if tag else prompt
        return Example(prompt, " " + instance.output.strip(), task.id, template.id + ("+fewshot" if shots else ""))

    def _chat(self, task, instance, rng, tag, shots) -> Example:
        template = _pick(prompts.CHAT_WITH_INPUT if instance.input.strip() else prompts.CHAT_NO_INPUT, rng)
        messages = [{"role": "system", "content": tag}] if tag else []
        for shot in shots:
            messages += [
                {"role": "user", "content": _fill(template, task, shot)},
                {"role": "assistant", "content": shot.output.strip()},
            ]
        messages.append({"role": "user", "content": _fill(template, task, instance)})
        return Example(
            self.chat(messages),
            instance.output.strip(),
            task.id,
            template.id + ("+fewshot" if shots else "") + "+chat_template",
        )

    def chat(self, messages: list[dict]) -> str:
        """A conversation as the prompt for the assistant's next turn."""
        if self.chat_tokenizer is not None:
            return self.chat_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise ValueError("messages: at least one user message is needed")
        return self.render(TaskRecord(id="chat", instruction=users[-1]), Instance("", "")).prompt

    def render_all(
        self,
        tasks: list[TaskRecord],
        seed: int,
        fewshot_fraction: float = _TRAINING.fewshot_fraction,
        fewshot_k: int = _TRAINING.fewshot_k,
    ) -> list[Example]:
        """Every instance of every task, each with a template drawn from seed. A fewshot_fraction of
        the instances of tasks with more than fewshot_k instances are shown after k exemplars of the
        same task (zero-/few-shot mix, as FLAN)."""
        rng = random.Random(seed)
        out = []
        for task in tasks:
            for index, inst in enumerate(task.instances):
                others = [o for j, o in enumerate(task.instances) if j != index]
                fewshot = task.format != "raw" and len(others) >= fewshot_k > 0 and rng.random() < fewshot_fraction
                shots = rng.sample(others, fewshot_k) if fewshot else []
                out.append(self.render(task, inst, rng, shots))
        return out


def _pick(choices: list[prompts.PromptTemplate], rng: random.Random | None) -> prompts.PromptTemplate:
    # evaluation always uses the first template, so scores are comparable across rounds
    return choices[0] if rng is None else rng.choice(choices)


def _fill(template: prompts.PromptTemplate, task: TaskRecord, instance: Instance) -> str:
    return template.render(instruction=task.instruction.strip(), input=instance.input.strip())


# ---- tokenization --------------------------------------------------------------------------------
def bos_prefix(tokenizer) -> list[int]:
    """The special tokens this tokenizer puts before any text by default (BOS for Llama-style ones)."""
    cached = getattr(tokenizer, "_reinstruct_bos_prefix", None)
    if cached is not None:
        return cached
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    prefix = next((full[:i] for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), [])
    try:
        tokenizer._reinstruct_bos_prefix = prefix
    except AttributeError:
        pass
    return prefix


def _with_prefix(tokenizer, ids: list[int]) -> list[int]:
    prefix = bos_prefix(tokenizer)
    return ids if not prefix or ids[: len(prefix)] == prefix else prefix + ids


def encode_prompt(tokenizer, text: str, *, encoder_decoder: bool = False, max_len: int = 0) -> list[int]:
    """A prompt's token ids, as training saw them (max_len 0: no truncation)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if encoder_decoder:
        suffix, prefix = [tokenizer.eos_token_id], []
    else:
        full = _with_prefix(tokenizer, ids)
        prefix, suffix, ids = full[: len(full) - len(ids)], [], ids
    if max_len:
        keep = max(max_len - len(prefix) - len(suffix), 1)
        ids = ids[-keep:]
    return prefix + ids + suffix


def tokenize_decoder_only(example: Example, tokenizer, max_len: int) -> dict:
    text = example.prompt + example.response
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    boundary = len(example.prompt)
    # A token belongs to the response if any of its characters do.
    labels = [tok if end > boundary else IGNORE_INDEX for tok, (_, end) in zip(ids, offsets)]
    ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    full = _with_prefix(tokenizer, ids)
    prefix = full[: len(full) - len(ids)]
    budget = max_len - len(prefix)
    if len(ids) > budget:  # keep the response: drop prompt tokens from the left, then cut the end
        overflow = len(ids) - budget
        prompt_len = sum(1 for label in labels if label == IGNORE_INDEX)
        cut = min(overflow, max(prompt_len - 1, 0))
        ids, labels = ids[cut:][:budget], labels[cut:][:budget]
    return {"input_ids": prefix + ids, "labels": [IGNORE_INDEX] * len(prefix) + labels}


def tokenize_encoder_decoder(example: Example, tokenizer, max_len: int) -> dict:
    source = encode_prompt(tokenizer, example.prompt, encoder_decoder=True, max_len=max_len)
    target = tokenizer(example.response.strip(), add_special_tokens=False)["input_ids"][: max_len - 1]
    return {"input_ids": source, "labels": target + [tokenizer.eos_token_id]}


def tokenize(example: Example, tokenizer, max_len: int, encoder_decoder: bool) -> dict:
    """input_ids and labels (IGNORE_INDEX outside the response) for training and for scoring."""
    if encoder_decoder:
        return tokenize_encoder_decoder(example, tokenizer, max_len)
    return tokenize_decoder_only(example, tokenizer, max_len)


def mean_response_nll(ids: list[int], labels: list[int], logprobs: list[float | None]) -> float:
    """Mean -log p over the labelled (response) positions, given each position's log-prob of its own
    token (the shape vLLM's prompt_logprobs and the OpenAI API's echo give)."""
    picked = [lp for lp, label in zip(logprobs, labels) if label != IGNORE_INDEX and lp is not None]
    return -sum(picked) / max(len(picked), 1)
