"""Domain records: a task in Self-Instruct's seed format plus the lineage every record carries."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field


@dataclass
class Instance:
    input: str = ""
    output: str = ""


@dataclass
class FilterVerdict:
    """What the filter decided about a record. reasons: the rejection's first, then what the instance
    rules removed (a kept task can have lost instances); max_rouge_l against the pool and the tasks kept
    before it, nearest_instruction the text giving it ("" when no rule let ROUGE-L run)."""

    kept: bool
    reasons: list[str] = field(default_factory=list)
    max_rouge_l: float = 0.0
    nearest_instruction: str = ""

    @property
    def label(self) -> str:
        """ "kept" or "rejected:<reason>", as the report and the tracker show it."""
        return "kept" if self.kept else f"rejected:{self.reasons[0] if self.reasons else 'unknown'}"


@dataclass
class Lineage:
    run_id: str = ""
    round: int = 0
    stage: str = ""
    model: str = ""
    prompt_template: str = ""
    context_task_ids: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    verdicts: list[str] = field(default_factory=list)  # which templates and raters touched it
    parent_id: str = ""
    filter: FilterVerdict | None = None  # None until the filter has seen it


# How the trainer renders a task: "instruction" uses the instruction templates; "raw" means the
# instruction is the exact prompt and the single instance's output the exact completion (the
# round-0 meta-tasks that teach the model to write instructions and instances).
TASK_FORMATS = ("instruction", "raw")


@dataclass
class TaskRecord:
    id: str
    instruction: str
    name: str = ""
    is_classification: bool = False
    instances: list[Instance] = field(default_factory=list)
    lineage: Lineage = field(default_factory=Lineage)
    format: str = "instruction"

    def to_row(self) -> dict:
        """A flat row for Parquet (scores as JSON: their keys differ from record to record)."""
        row = asdict(self)
        lineage = row.pop("lineage")
        lineage["scores_json"] = json.dumps(lineage.pop("scores"), sort_keys=True)
        row["lineage"] = lineage
        return row

    @classmethod
    def from_row(cls, row: dict) -> TaskRecord:
        lineage = dict(row.get("lineage") or {})
        lineage["scores"] = json.loads(lineage.pop("scores_json", None) or "{}")
        verdict = lineage.pop("filter", None)  # absent from files written before it was typed
        lineage["filter"] = FilterVerdict(**verdict) if verdict else None
        return cls(
            id=row["id"],
            instruction=row["instruction"],
            name=row.get("name") or "",
            is_classification=bool(row.get("is_classification")),
            instances=[Instance(**i) for i in (row.get("instances") or [])],
            lineage=Lineage(**lineage),
            format=row.get("format") or "instruction",
        )


def stable_id(*parts: object) -> str:
    """A short id that is the same every time the same parts are given (so reruns never duplicate)."""
    digest = hashlib.sha1("\x1f".join(str(p) for p in parts).encode()).hexdigest()
    return digest[:16]
