"""Self-Instruct (Wang et al. 2023), one round: the model writes instructions from 8 in-context tasks,
says which are classification tasks, writes instances for each; the filter keeps the novel ones."""

from __future__ import annotations

from ray_jobs.manifest import Dataset, Filtered, Instructions, Split
from services.api import filter_pb2, generator_pb2
from services.common.convert import task_from_proto, uri_source
from services.common.records import TaskRecord
from services.common.sections import to_message

from .run import Run


def generate_instructions(run: Run, k: int, model: str, split: Split, machine: list[TaskRecord]) -> Instructions:
    """Self-Instruct's bootstrap: prompts go out pool_refresh_prompts at a time (each batch in shards of
    fanout.prompts_per_shard, concurrently); after each batch the new instructions that pass the ROUGE-L
    and instruction rules join the machine tasks shown in context, so later prompts of the round see
    earlier ones (the reference's request batches)."""
    g = run.config.generation
    in_context, written, truncated, shards = list(machine), [], 0, 0
    for start in range(0, g.num_prompts, g.pool_refresh_prompts):
        batch = list(range(start, min(start + g.pool_refresh_prompts, g.num_prompts)))
        sharded = run.shard_stage(k, f"generate_instructions/batch-{start:05d}", "generator")
        pool_uri = sharded.uri("pool.parquet")
        run.store.write_tasks(pool_uri, in_context)
        batch_shards = sharded.shards(batch, run.config.fanout.prompts_per_shard)
        shards += len(batch_shards)
        responses = sharded.run(
            batch_shards,
            lambda shard, pool_uri=pool_uri: run.clients.generate_instructions(
                generator_pb2.GenerateInstructionsRequest(
                    context=run.ctx(k),
                    model_uri=model,
                    seed_tasks=uri_source(split.seed_train_uri),
                    machine_tasks=uri_source(pool_uri),
                    num_prompts=len(shard.items),
                    num_human_in_context=g.num_human_in_context,
                    num_machine_in_context=g.num_machine_in_context,
                    sampling=run.sampling(g.max_new_tokens, run.config.seed + k, presence_penalty=g.presence_penalty),
                    first_prompt_index=shard.items[0],
                    output_uri=shard.output_uri,
                )
            ),
            generator_pb2.GenerateInstructionsResponse,
            on_shard=lambda done, total: run.reporter.shards(k, "generate_instructions", done, total),
        )
        new = sharded.parts_tasks([r.output.uri for r in responses])
        written += new
        truncated += sum(r.completions_truncated for r in responses)
        if new and batch[-1] + 1 < g.num_prompts:
            in_context += _novel_instructions(run, k, split, in_context, new)
    done = run.write(k, "instructions", written)
    return Instructions(
        uri=done.uri,
        count=done.count,
        shards=shards,
        prompts=g.num_prompts,
        truncated=truncated,
        model_uri=model,
        in_context_pool=len(in_context),
    )


def _novel_instructions(
    run: Run, k: int, split: Split, pool: list[TaskRecord], new: list[TaskRecord]
) -> list[TaskRecord]:
    """The new instructions that pass the instruction rules and ROUGE-L < threshold against seeds + pool."""
    refresh_pool = run.write(k, "refresh_pool", run.store.read_tasks(split.seed_all_uri) + pool)
    candidates = run.write(k, "refresh_candidates", new)
    response = run.clients.filter_tasks(
        filter_pb2.FilterTasksRequest(
            context=run.ctx(k),
            candidates=uri_source(candidates.uri),
            pool=uri_source(refresh_pool.uri),
            instructions_only=True,
            filter=to_message(run.config.filter),
        )
    )
    return [task_from_proto(t) for t in response.kept]


def classify(run: Run, k: int, model: str, instructions: Dataset) -> Dataset:
    return run.sharded(
        k,
        "classify",
        "classified",
        instructions,
        lambda shard_uri, output_uri: run.clients.classify_instructions(
            generator_pb2.ClassifyInstructionsRequest(
                context=run.ctx(k), model_uri=model, tasks=uri_source(shard_uri), output_uri=output_uri
            )
        ),
    )


def generate_instances(run: Run, k: int, model: str, split: Split, classified: Dataset) -> Dataset:
    """Output-first for classification tasks, input-first otherwise; greedy, presence penalty 1.5."""
    g = run.config.generation
    return run.sharded(
        k,
        "generate_instances",
        "candidates",
        classified,
        lambda shard_uri, output_uri: run.clients.generate_instances(
            generator_pb2.GenerateInstancesRequest(
                context=run.ctx(k),
                model_uri=model,
                tasks=uri_source(shard_uri),
                demonstrations=uri_source(split.seed_train_uri),
                num_demonstrations=g.num_demonstrations,
                sampling=run.sampling(
                    g.instance_max_new_tokens, run.config.seed + k, g.instance_temperature, g.instance_presence_penalty
                ),
                output_uri=output_uri,
            )
        ),
    )


def filter_candidates(run: Run, k: int, split: Split, machine: list[TaskRecord], candidates: Dataset) -> Filtered:
    """A candidate joins the pool only if its ROUGE-L with every pooled instruction (seeds, earlier
    rounds, the ones kept before it) is < 0.7 and it passes the rules, dedup and decontamination."""
    if candidates.count == 0:
        return Filtered()
    pool = run.write(k, "filter_pool", run.store.read_tasks(split.seed_all_uri) + machine)
    pool_scores = _pool_scores(run, k, candidates, pool.uri)
    response = run.clients.filter_tasks(
        filter_pb2.FilterTasksRequest(
            context=run.ctx(k),
            candidates=uri_source(candidates.uri),
            pool=uri_source(pool.uri),  # pool_scores or not: dedup and the demonstration rule read the pool
            pool_scores=pool_scores,
            filter=to_message(run.config.filter),
            kept_uri=run.uri(k, "kept"),
            decontaminate_against=uri_source(split.seed_heldout_uri),
            rejected_uri=run.uri(k, "rejected"),
        )
    )
    return Filtered(
        kept_uri=response.kept_ref.uri,
        kept_count=response.kept_count,
        rejected_uri=response.rejected_ref.uri,
        candidates=response.candidates,
        funnel={step.rule: step.removed for step in response.funnel},
        max_rouge_l=[v.max_rouge_l for v in response.verdicts],
    )


def _pool_scores(run: Run, k: int, candidates: Dataset, pool_uri: str) -> list[filter_pb2.NoveltyScore] | None:
    """The filter's parallel part, when the candidates fill more than one shard: each shard's max ROUGE-L
    against the pool on whichever filter replica is free; FilterTasks then runs only the sequential part
    (candidates against those kept before them)."""
    per_shard = run.config.fanout.filter_candidates_per_shard
    if candidates.count <= per_shard:
        return None
    sharded = run.shard_stage(k, "filter", "filter")
    responses = sharded.run(
        sharded.shards(candidates.tasks(run.store), per_shard, write_inputs=True),
        lambda shard: run.clients.score_novelty(
            filter_pb2.ScoreNoveltyRequest(
                context=run.ctx(k), candidates=uri_source(shard.input_uri), pool=uri_source(pool_uri)
            )
        ),
        filter_pb2.ScoreNoveltyResponse,
        on_shard=lambda done, total: run.reporter.shards(k, "filter", done, total),
    )
    return [score for r in responses for score in r.scores]
