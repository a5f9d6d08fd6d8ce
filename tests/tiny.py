"""Settings that make a whole round run in a minute or two on 2 CPU cores (tests only)."""

from pathlib import Path

# Every third built-in seed task with at most two instances (one per label for classification): the
# same mix of categories at a sixth of the training examples, so each of a tiny run's training jobs
# takes seconds, not minutes. The built-in set itself is what the default run and the unit tests use.
TINY_SEEDS = str(Path(__file__).resolve().parent / "data" / "tiny_seed_tasks.jsonl")


def tiny_settings(store_root: str, builtin_cache: str, grpc_port: int = 9000, http_port: int = 8000) -> dict:
    return {
        "model": {"base": "builtin:tiny-llama", "builtin_cache_dir": builtin_cache},
        "store": {"root": store_root},
        "seeds": {"path": TINY_SEEDS},
        "serve": {"grpc_port": grpc_port, "http_port": http_port, "request_timeout_s": 300},
        "generation": {
            "num_prompts": 4,
            "pool_refresh_prompts": 2,
            "max_new_tokens": 48,
            "instance_max_new_tokens": 48,
            "batch_size": 8,
        },
        "training": {
            "epochs": 1,
            "meta_tasks": True,
            "bootstrap_epochs": 2,
            "bootstrap_examples_per_task": 1,
            "max_seq_len": 256,
            "batch_size": 16,
            "poll_interval_s": 0.5,
        },
        "evaluation": {"max_instances_per_task": 1, "max_new_tokens": 16},
        "backtranslation": {"segments_per_round": 6, "backward_epochs": 2, "max_new_tokens": 16},
        # the seeds-only control is one more training job per run: test_e2e_grpc's round turns it on
        "loop": {"rounds": 1, "bootstrap": True, "control": False},
        "fanout": {"tasks_per_shard": 2, "max_in_flight": 2},  # several shards per stage, two at once
        "tracking": {"enabled": False},  # tests/test_tracking.py runs the tracker against a real server
    }


def owned_context(store_root: str, run_id: str, round_index: int = 1):
    """A RunContext with the run's key, as the run's driver sends it: the run is created (its owner
    file and key, RunStore.claim_run) when it is new, and its key read back when it is not."""
    from services.api import common_pb2
    from services.common.store import RunStore

    key = RunStore(store_root).claim_run(run_id)
    return common_pb2.RunContext(run_id=run_id, round=round_index, run_key=key)


def fill_example_run(store, run_id: str = "r") -> None:
    """A small run in the store with every kind of stage output the report draws on."""
    from services.common.records import TaskRecord

    tasks = [
        TaskRecord(id=f"i{i}", instruction=f"Write {w} about the sea.") for i, w in enumerate(["a poem", "a song"])
    ]
    store.write_tasks(store.dataset_uri(run_id, 1, "instructions"), tasks)
    store.commit_stage(run_id, 0, "train", {"losses": [3.0, 2.0, 1.5]})
    metrics = {"category": "generation", "answer_words": 30.0}
    m0 = {
        "a": {"score": 0.2, "nll": 2.0, "rouge_l": 0.2, **metrics},
        "b": {"score": 0.3, "nll": 2.2, "rouge_l": 0.3, **metrics},
    }
    store.commit_stage(run_id, 0, "evaluate", {"task_metrics": m0, "score": 0.25, "nll": 2.1, "answer_words": 30.0})
    store.commit_stage(
        run_id, 0, "control_evaluate", {"task_metrics": m0, "score": 0.27, "nll": 1.9, "answer_words": 12.0}
    )
    store.commit_stage(
        run_id,
        0,
        "promote",
        {
            "promoted": True,
            "reason": "no incumbent",
            "model_uri": "m0",
            "candidate": 0.25,
            "candidate_interval": [0.2, 0.3],
            "confidence": 0.9,
        },
    )
    store.commit_stage(
        run_id, 1, "generate_instructions", {"uri": store.dataset_uri(run_id, 1, "instructions"), "count": 2}
    )
    from services.common.records import FilterVerdict, Instance, Lineage

    kept = [
        TaskRecord(
            id="k",
            instruction="Write a haiku about <autumn>.",
            instances=[Instance("", "Leaves fall")],
            lineage=Lineage(filter=FilterVerdict(True, [], 0.31, "Write a poem.")),
        )
    ]
    rejected = [
        TaskRecord(id="x", instruction="Draw a map.", lineage=Lineage(filter=FilterVerdict(False, ["too_short"])))
    ]
    curated = [
        TaskRecord(
            id=f"b{i}",
            instruction=f"Explain item {i}.",
            instances=[Instance("", f"text {i}")],
            lineage=Lineage(stage="backtranslate", scores={"curation": float(i % 6)}),
        )
        for i in range(8)
    ]
    for name, records in (("kept", kept), ("rejected", rejected), ("curated", curated)):
        store.write_tasks(store.dataset_uri(run_id, 1, name), records)
    store.commit_stage(
        run_id,
        1,
        "filter",
        {
            "candidates": 5,
            "kept_count": 2,
            "funnel": {"too_short": 3},
            "max_rouge_l": [0.1, 0.5, 0.8],
            "elapsed_s": 1.5,
            "kept_uri": store.dataset_uri(run_id, 1, "kept"),
            "rejected_uri": store.dataset_uri(run_id, 1, "rejected"),
        },
    )
    store.commit_stage(
        run_id, 1, "curate", {"uri": store.dataset_uri(run_id, 1, "curated"), "count": 8, "elapsed_s": 12.25}
    )
    store.commit_stage(run_id, 1, "filter_augmented", {"candidates": 8, "kept_count": 1, "curation_threshold": 5})
    store.commit_stage(run_id, 1, "train", {"losses": [2.0, 1.0]})
    store.commit_stage(run_id, 1, "evaluate", {"score": 0.15, "nll": 1.8, "answer_words": 14.0})
    gate = {"gain": [0.3, -0.1, 0.7], "gain_mde": 0.41, "score_difference": [-0.1, -0.2, 0.0], "score_mde": 0.12}
    store.commit_stage(
        run_id,
        1,
        "promote",
        {
            "promoted": False,
            "metric": "nll",
            "interval": "t",
            "reason": "vs incumbent: nll gain lower bound -0.1000 <= margin +0.0000",
            "model_uri": "m0",
            "candidate": 0.15,
            "candidate_interval": [0.1, 0.2],
            "confidence": 0.9,
            "comparisons": [
                {
                    "against": "incumbent",
                    "passed": False,
                    "length_controlled_score_difference": [-0.05, -0.2, 0.1],
                    **gate,
                }
            ],
        },
    )
    store.commit_stage(
        run_id,
        1,
        "test",
        {
            "model_0": "m0",
            "final_model": "m0",
            "control_model": "c0",
            "model_0_score": 0.28,
            "final_score": 0.28,
            "control_score": 0.31,
            "model_0_nll": 2.0,
            "final_nll": 2.0,
            "control_nll": 1.7,
            "answer_words": {"model_0": 40.0, "final": 40.0, "control": 15.0},
            "difference": [0.0, 0.0, 0.0],
            "nll_gain": [0.0, 0.0, 0.0],
            "over_control": [-0.03, -0.1, 0.04],
            "nll_gain_over_control": [-0.3, -0.4, -0.2],
            "confidence": 0.9,
            "interval": "t",
            "num_tasks": 2,
        },
    )
