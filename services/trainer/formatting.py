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


def render_all(tasks: list[TaskRecord], seed: int, augmented_tag: str = "") -> list[Example]:
    rng = random.Random(seed)
    return [render(task, inst, rng, augmented_tag) for task in tasks for inst in task.instances]


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
