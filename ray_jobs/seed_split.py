"""Held-out tasks are held out by task, never by instance, stratified by classification."""

from __future__ import annotations

import random

from services.common.records import TaskRecord


def split_by_task(
    tasks: list[TaskRecord], heldout_fraction: float, seed: int
) -> tuple[list[TaskRecord], list[TaskRecord]]:
    """(train, held-out). Deterministic for a given seed and set of task ids, whatever their order."""
    rng = random.Random(seed)
    train, heldout = [], []
    for is_classification in (False, True):
        group = sorted((t for t in tasks if t.is_classification == is_classification), key=lambda t: t.id)
        rng.shuffle(group)
        n_heldout = round(len(group) * heldout_fraction)
        heldout.extend(group[:n_heldout])
        train.extend(group[n_heldout:])
    return train, heldout
