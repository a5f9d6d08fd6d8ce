"""What each stage hands the next: typed results. The manifest keeps them as JSON (`to_dict`), so a
resumed driver gets the same objects back (`from_dict`) for a committed stage, and everything that
reads a run afterwards (the summary table, `reinstruct status` and `export`, the report) reads them
through `RoundRecord`, never the manifest's keys."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from services.common.records import TaskRecord
from services.common.store import RunStore

Result = TypeVar("Result", bound="StageResult")


@dataclass
class StageResult:
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[Result], data: dict[str, Any]) -> Result:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Dataset(StageResult):
    """A stage's tasks in the run store."""

    uri: str = ""
    count: int = 0
    shards: int = 0  # requests the stage went out in (0: none, nothing to do)

    def tasks(self, store: RunStore) -> list[TaskRecord]:
        return store.read_tasks(self.uri) if self.uri and self.count else []


@dataclass
class Instructions(Dataset):
    prompts: int = 0
    truncated: int = 0  # completions cut by max_new_tokens
    model_uri: str = ""
    in_context_pool: int = 0  # machine tasks in context by the round's last prompts


@dataclass
class Segments(Dataset):
    corpus: str | list[str] = ""


@dataclass
class RatingPool(Dataset):
    rounds: list[int] = field(default_factory=list)  # whose backtranslated pairs model k rates


@dataclass
class TrainMix(Dataset):
    seed: int = 0
    machine: int = 0
    augmented: int = 0
    meta: int = 0


@dataclass
class Filtered(StageResult):
    kept_uri: str = ""
    kept_count: int = 0
    rejected_uri: str = ""
    candidates: int = 0
    funnel: dict[str, int] = field(default_factory=dict)
    max_rouge_l: list[float] = field(default_factory=list)
    curation_threshold: float | None = None  # backtranslated pairs only: the min_curation_score applied
    scores: dict[str, int] = field(default_factory=dict)  # curation score histogram (backtranslated pairs)
    rater: str = ""  # backtranslation.curation: rubric or likelihood
    rater_auc: float | None = None  # the rater's ROC AUC on the round's control pairs
    selection: str = ""  # threshold (score >= k), rank (the best kept_share) or rater_below_floor (none kept)
    kept_share: float | None = None

    def kept(self, store: RunStore) -> list[TaskRecord]:
        return store.read_tasks(self.kept_uri) if self.kept_uri and self.kept_count else []


@dataclass
class CurationControl(Dataset):
    """The rater scored matched seed pairs and their shuffled twins (another task's instruction)."""

    rater: str = ""
    auc: float | None = None  # ROC AUC of matched over shuffled; None without control pairs
    matched: int = 0
    shuffled: int = 0
    matched_mean: float = 0.0  # mean curation score of each kind
    shuffled_mean: float = 0.0


@dataclass
class Split(StageResult):
    seed_train_uri: str = ""
    seed_heldout_uri: str = ""
    seed_dev_uri: str = ""
    seed_test_uri: str = ""
    seed_all_uri: str = ""
    train_tasks: int = 0
    heldout_tasks: int = 0
    dev_tasks: int = 0
    test_tasks: int = 0
    dev_task_ids: list[str] = field(default_factory=list)
    test_task_ids: list[str] = field(default_factory=list)


@dataclass
class Trained(StageResult):
    model_uri: str = ""
    base_model: str = ""  # the model this round fine-tuned (training.from_base)
    job_id: str = ""
    steps: int = 0
    final_loss: float = 0.0
    losses: list[float] = field(default_factory=list)
    examples: int = 0
    resumed_from_step: int = 0
    model_digest: str = ""  # the checkpoint's digest as its training job committed it (checked before use)


@dataclass
class Evaluated(StageResult):
    model_uri: str = ""
    metric: str = "nll"  # the gate's metric
    score: float = 0.0
    rouge_l: float = 0.0
    exact_match: float = 0.0
    nll: float = 0.0
    num_tasks: int = 0
    num_instances: int = 0
    categories: dict[str, float] = field(default_factory=dict)
    # task id -> {"score", "nll", "rouge_l", "category", "answer_words"}: what the gate pairs
    task_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    predictions_uri: str = ""
    shards: int = 0
    answer_words: float = 0.0  # mean over tasks: a length or format effect shows here
    answer_tokens: float = 0.0
    truncated: float = 0.0  # share of answers cut by evaluation.max_new_tokens
    stops: list[str] = field(default_factory=list)  # what ended answers besides EOS

    def per_task(self, metric: str) -> dict[str, float]:
        return {t: m[metric] for t, m in self.task_metrics.items()}


@dataclass
class Gate(StageResult):
    """One comparison of the gate: the candidate against the incumbent or the control."""

    against: str = ""
    against_model_uri: str = ""
    against_mean: float = 0.0
    gain: list[float] = field(default_factory=list)  # estimate, low, high (positive: the candidate is better)
    gain_mde: float = 0.0  # minimum detectable gain at 80% power, on this data
    score_difference: list[float] = field(default_factory=list)  # estimate, low, high
    score_mde: float = 0.0
    length_controlled_score_difference: list[float] = field(default_factory=list)  # at equal answer length
    passed: bool = False
    reason: str = ""


@dataclass
class Decision(StageResult):
    """The gate's decision, and the model the loop stands on afterwards."""

    promoted: bool = False
    metric: str = "nll"
    candidate: float = 0.0
    candidate_interval: list[float] = field(default_factory=list)  # low, high of the candidate's mean
    candidate_score: float = 0.0
    candidate_score_interval: list[float] = field(default_factory=list)
    incumbent: float | None = None
    difference: float = 0.0  # the gain over the incumbent, its interval low..high (no incumbent: the mean)
    low: float = 0.0
    high: float = 0.0
    confidence: float = 0.0
    interval: str = ""  # t, bca or percentile
    margin: float = 0.0
    score_margin: float = 0.0
    reason: str = ""
    comparisons: list[dict[str, Any]] = field(default_factory=list)  # Gate.to_dict() each
    model_uri: str = ""  # the promoted model: the candidate if promoted, else the incumbent
    task_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # the promoted model's
    candidate_model_uri: str = ""

    def gates(self) -> list[Gate]:
        return [Gate.from_dict(c) for c in self.comparisons]


@dataclass
class Judged(StageResult):
    win_rate: float = 0.0
    tie_rate: float = 0.0
    loss_rate: float = 0.0
    judged_pairs: int = 0
    score_difference: list[float] = field(default_factory=list)  # estimate, low, high


@dataclass
class Benchmarked(StageResult):
    """One standard benchmark (an lm-evaluation-harness task) on one model of the test stage."""

    model: str = ""  # "model_0", "control" or "final"
    model_uri: str = ""
    task: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # lm-eval's metric name -> value
    stderrs: dict[str, float] = field(default_factory=dict)  # lm-eval's standard errors (where it gives one)
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    samples: int = 0  # examples scored (after evaluation.benchmark_limit)
    version: str = ""  # the task's version
    source: str = ""  # "reinstruct" (shipped), "lm-eval" (built-in) or the task file


@dataclass
class Tested(StageResult):
    """The test stage: model 0, the control and the final model on test tasks that chose nothing."""

    model_0: str = ""
    final_model: str = ""
    control_model: str = ""
    model_0_score: float = 0.0
    final_score: float = 0.0
    control_score: float | None = None
    model_0_nll: float = 0.0
    final_nll: float = 0.0
    control_nll: float | None = None
    answer_words: dict[str, float] = field(default_factory=dict)  # "model_0", "control", "final"
    difference: list[float] = field(default_factory=list)  # final minus model 0, score: estimate, low, high
    nll_gain: list[float] = field(default_factory=list)  # model 0's NLL minus the final model's
    length_controlled_difference: list[float] = field(default_factory=list)
    over_control: list[float] = field(default_factory=list)  # final minus control, score
    nll_gain_over_control: list[float] = field(default_factory=list)
    confidence: float = 0.0
    interval: str = ""
    num_tasks: int = 0
    benchmarks: list[dict[str, Any]] = field(default_factory=list)  # Benchmarked.to_dict() each
    lm_eval_version: str = ""  # of the benchmarks ("": none ran)
    benchmark_limit: int = 0  # examples per benchmark task (0: all)
    benchmark_prompt_style: str = ""  # chat or plain
    benchmark_adapter: str = ""  # lm-eval's model adapter: hf or vllm

    def benchmark_results(self) -> list[Benchmarked]:
        return [Benchmarked.from_dict(b) for b in self.benchmarks]


# Every stage the loop commits, and what it commits: the one schema of a manifest's rounds.
STAGE_KINDS: dict[str, type[StageResult]] = {
    "split": Split,
    "train_data": TrainMix,
    "train": Trained,
    "evaluate": Evaluated,
    "control_data": TrainMix,
    "control_train": Trained,
    "control_evaluate": Evaluated,
    "judge": Judged,
    "promote": Decision,
    "test": Tested,
    "backward_data": Dataset,
    "backward_train": Trained,
    "generate_instructions": Instructions,
    "classify": Dataset,
    "generate_instances": Dataset,
    "filter": Filtered,
    "segments": Segments,
    "backtranslate": Dataset,
    "rating_pool": RatingPool,
    "curate": Dataset,
    "curation_control": CurationControl,
    "filter_augmented": Filtered,
}


@dataclass
class RoundRecord:
    """One round of a run as committed: its stages' typed results, keyed by stage name."""

    index: int
    stages: dict[str, StageResult]
    committed_at: dict[str, float]

    def get(self, name: str, kind: type[Result]) -> Result | None:
        """The stage's result if the round committed it (kind must be the stage's registered kind)."""
        if STAGE_KINDS[name] is not kind:
            raise TypeError(f"stage {name!r} commits {STAGE_KINDS[name].__name__}, not {kind.__name__}")
        result = self.stages.get(name)
        return result if isinstance(result, kind) else None


def rounds_of(manifest: dict[str, Any]) -> list[RoundRecord]:
    """A manifest's rounds, in order, as typed results."""
    records = []
    for key in sorted(manifest.get("rounds", {}), key=int):
        stages, committed_at = {}, {}
        for name, output in manifest["rounds"][key].get("stages", {}).items():
            stages[name] = STAGE_KINDS.get(name, StageResult).from_dict(output)
            committed_at[name] = output.get("committed_at", 0.0)
        records.append(RoundRecord(int(key), stages, committed_at))
    return records
