"""Turning tasks into training sequences, for decoder-only and encoder-decoder models.

Decoder-only: the loss covers exactly the response tokens plus an appended EOS; prompt tokens are
masked (-100). The whole text is tokenized once and the boundary found by character offsets, so the
labels cover exactly the tokens the model sees (tokenizing prompt and response apart and gluing them
can differ at the boundary and silently drop the first answer token from the loss).
Encoder-decoder: the prompt goes to the encoder; the response plus EOS are the decoder labels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..common import prompts
from ..common.records import Instance, TaskRecord

IGNORE_INDEX = -100


@dataclass
class Example:
    prompt: str
    response: str
    task_id: str
    template_id: str


def render(task: TaskRecord, instance: Instance, rng: random.Random | None = None, augmented_tag: str = "") -> Example:
    """Picks one of several instruction templates (rng=None: the fixed evaluation template).
    Backtranslated data gets augmented_tag before its prompt, so the model can tell it apart."""
    if task.format == "raw":
        return Example(task.instruction, instance.output, task.id, "raw")
    if augmented_tag and task.lineage.stage == "backtranslate":
        example = render(TaskRecord(id=task.id, instruction=task.instruction), instance, rng)
        return Example(f"{augmented_tag}\n{example.prompt}", example.response, task.id, example.template_id)
    has_input = bool(instance.input.strip())
    choices = prompts.TRAIN_WITH_INPUT if has_input else prompts.TRAIN_NO_INPUT
    if rng is None:
        template = prompts.EVAL_WITH_INPUT if has_input else prompts.EVAL_NO_INPUT
    else:
        template = rng.choice(choices)
    prompt = template.render(instruction=task.instruction.strip(), input=instance.input.strip())
    return Example(prompt, " " + instance.output.strip(), task.id, template.id)


def render_all(tasks: list[TaskRecord], seed: int, augmented_tag: str = "", fewshot_fraction: float = 0.0,
               fewshot_k: int = 2, chat_tokenizer=None) -> list[Example]:
    """Every instance of every task, each with a template drawn from seed. A fewshot_fraction of the
    instances of tasks with more than fewshot_k instances are shown after k exemplars of the same task
    (zero-/few-shot mix, as FLAN). chat_tokenizer: use its chat template instead of ours."""
    rng = random.Random(seed)
    out = []
    for task in tasks:
        for index, inst in enumerate(task.instances):
            example = render(task, inst, rng, augmented_tag)
            if chat_tokenizer is not None and task.format != "raw":
                example = _chat(chat_tokenizer, example, task, inst)
            others = [o for j, o in enumerate(task.instances) if j != index]
            if task.format != "raw" and len(others) >= fewshot_k > 0 and rng.random() < fewshot_fraction:
                shots = [render(task, o, rng, augmented_tag) for o in rng.sample(others, fewshot_k)]
                prefix = "".join(f"{s.prompt}{s.response}\n\n" for s in shots)
                example = Example(prefix + example.prompt, example.response, task.id, example.template_id + "+fewshot")
            out.append(example)
    return out


def _chat(tokenizer, example: Example, task: TaskRecord, inst: Instance) -> Example:
    user = task.instruction.strip() + (f"\n\n{inst.input.strip()}" if inst.input.strip() else "")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    return Example(prompt, inst.output.strip(), task.id, "chat_template")


def tokenize_decoder_only(example: Example, tokenizer, max_len: int) -> dict:
    text = example.prompt + example.response
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    boundary = len(example.prompt)
    # A token belongs to the response if any of its characters do.
    labels = [tok if end > boundary else IGNORE_INDEX for tok, (_, end) in zip(ids, offsets)]
    ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    if len(ids) > max_len:  # keep the response: drop prompt tokens from the left, then cut the end
        overflow = len(ids) - max_len
        prompt_len = sum(1 for label in labels if label == IGNORE_INDEX)
        cut = min(overflow, max(prompt_len - 1, 0))
        ids, labels = ids[cut:], labels[cut:]
        ids, labels = ids[:max_len], labels[:max_len]
    return {"input_ids": ids, "labels": labels}


def tokenize_encoder_decoder(example: Example, tokenizer, max_len: int) -> dict:
    source = tokenizer(example.prompt, add_special_tokens=False)["input_ids"][-(max_len - 1):]
    target = tokenizer(example.response.strip(), add_special_tokens=False)["input_ids"][: max_len - 1]
    return {"input_ids": source + [tokenizer.eos_token_id], "labels": target + [tokenizer.eos_token_id]}


def tokenize(example: Example, tokenizer, max_len: int, encoder_decoder: bool) -> dict:
    if encoder_decoder:
        return tokenize_encoder_decoder(example, tokenizer, max_len)
    return tokenize_decoder_only(example, tokenizer, max_len)


def collate(features: list[dict], pad_id: int) -> dict:
    """Right-padded batch; padded label positions are ignored by the loss."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    label_width = max(len(f["labels"]) for f in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), label_width), IGNORE_INDEX, dtype=torch.long)
    for row, f in enumerate(features):
        input_ids[row, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        attention[row, : len(f["input_ids"])] = 1
        labels[row, : len(f["labels"])] = torch.tensor(f["labels"])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


# ---- packing -----------------------------------------------------------------------------------
def pack(features: list[dict], max_len: int) -> list[dict]:
    """First-fit-decreasing bins of whole examples, each at most max_len tokens. Every packed example
    keeps its own position ids (0, 1, ...) and a segment id, so attention never crosses examples."""
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(features[i]["input_ids"])
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_len - n)
    packed = []
    for members in bins:
        ids, labels, positions, segments = [], [], [], []
        for segment, i in enumerate(members):
            f = features[i]
            ids += f["input_ids"]
            # an example's first token is never a target (nothing of its own precedes it): masking it
            # also stops the previous example's last token from being trained to predict it
            labels += [IGNORE_INDEX] + f["labels"][1:]
            positions += list(range(len(f["input_ids"])))
            segments += [segment] * len(f["input_ids"])
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions, "segment_ids": segments,
                       "examples": len(members)})
    return packed


def collate_packed(packs: list[dict], pad_id: int) -> dict:
    """Right-padded packed batch with a block-diagonal causal mask (B, 1, L, L): a token attends only
    to earlier tokens of its own example. Pads attend to themselves (a row with no key is NaN)."""
    import torch

    width = max(len(p["input_ids"]) for p in packs)
    batch = len(packs)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((batch, width), dtype=torch.long)
    segments = torch.full((batch, width), -1, dtype=torch.long)
    for row, p in enumerate(packs):
        n = len(p["input_ids"])
        input_ids[row, :n] = torch.tensor(p["input_ids"])
        labels[row, :n] = torch.tensor(p["labels"])
        positions[row, :n] = torch.tensor(p["position_ids"])
        segments[row, :n] = torch.tensor(p["segment_ids"])
        positions[row, n:] = torch.arange(width - n)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = segments[:, :, None] == segments[:, None, :]
    eye = torch.eye(width, dtype=torch.bool)[None]
    mask = (causal[None] & same) | eye
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "attention_mask": mask[:, None]}


def real_token_share(batches_lengths: list[tuple[int, int]]) -> float:
    """(real tokens, width) per sequence -> share of non-pad tokens."""
    total = sum(width for _, width in batches_lengths)
    return sum(real for real, _ in batches_lengths) / total if total else 0.0
