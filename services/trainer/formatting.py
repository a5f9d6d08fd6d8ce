"""Batching training sequences: right-padded batches, and packing several examples per sequence.

Rendering and tokenization (labels on the response tokens plus EOS) live in
services/common/rendering.py, shared with evaluation and the engines.
"""

from __future__ import annotations

from ..common.rendering import IGNORE_INDEX


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
        packed.append(
            {
                "input_ids": ids,
                "labels": labels,
                "position_ids": positions,
                "segment_ids": segments,
                "examples": len(members),
            }
        )
    return packed


def collate_packed(packs: list[dict], pad_id: int) -> dict:
    """Right-padded packed batch with a block-diagonal causal mask (B, 1, L, L): a token attends only
    to earlier tokens of its own example. Correct under SDPA and eager attention (tests check both);
    models.load_model pins SDPA. Pads attend to themselves (a row with no key is NaN)."""
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
    allowed = (causal[None] & same) | eye
    # Additive float mask (0 or the most negative float): transformers passes a 4-D mask through as
    # is, SDPA adds a float mask to the scores, and eager attention adds it too; a boolean mask would
    # mean "attend" to SDPA but be added as 0/1 by eager, i.e. no masking at all.
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "attention_mask": mask[:, None]}
