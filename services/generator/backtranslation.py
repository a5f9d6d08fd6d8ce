"""Instruction backtranslation: a backward model writes instructions for unlabelled text
(self-augmentation), and the forward model rates each pair (self-curation).

Two raters read the rating from the model's probabilities, never from generated text:
- rubric (Humpback's): the 5-point rubric as a user turn, the answer pre-filled up to "Score: "; the
  rating is the expected score over "1".."5" (their probabilities normalised over the five), after
  contextual calibration (Zhao et al. 2021): the distribution the same prompt gives a content-free
  pair ("N/A" instruction and answer) is divided out (W = diag(p_cf)^-1, b = 0) and the result
  renormalised, so a model's bias towards one digit does not pass for a judgement.
- likelihood (a departure; the idea behind Cherry/IFD and GPTScore): pointwise mutual information,
  PMI = NLL(y | content-free prompt) - NLL(y | x), in nats per response token: how much better the
  instruction explains the response than no instruction does. Mapped to 1 + 4 sigmoid(PMI / PMI_SCALE),
  3 meaning "explains nothing"; the pool is always kept by rank (selection_threshold).
Each round a control set of seed pairs, matched and shuffled, measures the rater (rater_auc).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from ..common import prompts
from ..common.engines import GenerationEngine
from ..common.records import Instance, Lineage, TaskRecord, stable_id
from ..common.rendering import DEFAULT_PROMPT_FORMAT, PromptFormat, Renderer

BACKWARD_STOPS = ("\n\n\n", "\nResponse:")  # an instruction may carry a context paragraph
RATERS = ("rubric", "likelihood")
SCORE_PREFIX = "Score:"  # the answer is pre-filled up to "Score: "
SCORE_TOKENS = tuple(str(s) for s in prompts.CURATION_SCORES[1:])  # "1".."5"
CONTENT_FREE = "N/A"  # the content-free instruction and answer (Zhao et al. 2021)
# PMI (nats per token) that maps to 1 + 4 sigmoid(1) = 3.9: on SmolLM2-135M, matched seed pairs average
# +2.4 and shuffled ones -0.4 (benchmarks/curation_auc.py, 12 pairs). Only the 1-5 display depends on
# it: likelihood keeps by rank.
PMI_SCALE = 1.0
SCORE_DECIMALS = 4  # ratings are stored rounded, so a rank cut-off survives the filter's float32 field


def build_backward_prompt(output: str) -> str:
    return prompts.BACKWARD.render(output=output.strip())


def parse_backward(completion: str) -> str:
    """The instruction the backward model wrote: up to two paragraphs (an instruction and the context
    it gives, as the seed prompts it learnt from), each paragraph's whitespace collapsed."""
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", completion.strip())]
    return "\n\n".join(p for p in paragraphs[:2] if p)


def _ngrams(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def repeats_segment(instruction: str, segment: str) -> bool:
    """True when the instruction is the segment's own text (80% of its word 5-grams or more, a quoted
    sentence inside a question is not): no instruction a user would write, and the likelihood rater's
    favourite (a response its own text predicts has the highest PMI there is)."""
    grams = _ngrams(instruction)
    return bool(grams) and len(grams & _ngrams(segment)) >= 0.8 * len(grams)


def seed_prompt(task: TaskRecord, instance: Instance) -> str:
    """The whole prompt side of a seed example: instruction, and its input when it has one."""
    return task.instruction.strip() + (f"\n\n{instance.input.strip()}" if instance.input.strip() else "")


def backward_tasks(seed_tasks: list[TaskRecord]) -> list[TaskRecord]:
    """(output -> instruction) pairs from the seed data, as raw tasks for the trainer. The target is
    the whole prompt side (instruction + input): "negative" alone does not say "Classify the review";
    Humpback's x is everything the user wrote."""
    out = []
    for task in seed_tasks:
        for j, inst in enumerate(task.instances):
            if not inst.output.strip():
                continue
            out.append(
                TaskRecord(
                    id=f"backward-{task.id}-{j}",
                    instruction=build_backward_prompt(inst.output),
                    instances=[Instance("", " " + seed_prompt(task, inst))],
                    format="raw",
                    lineage=Lineage(
                        stage="backward_data", model="human", prompt_template=prompts.BACKWARD.id, parent_id=task.id
                    ),
                )
            )
    return out


def curation_meta_tasks(seed_tasks: list[TaskRecord], seed: int) -> list[TaskRecord]:
    """Teach the rating format: a seed pair is a 5, a pair with another task's output a 1 or 2. Ordinary
    instruction tasks (the rubric, then "Score: N"), so training renders them as the rubric rater
    shows them."""
    rng = random.Random(seed)
    out = []
    for task in seed_tasks:
        inst = task.instances[0]
        other = rng.choice([t for t in seed_tasks if t.id != task.id])
        for kind, output, score in (
            ("good", inst.output, 5),
            ("bad", other.instances[0].output, rng.choice([1, 2])),
        ):
            out.append(
                TaskRecord(
                    id=f"meta-curate-{kind}-{task.id}",
                    instruction=prompts.CURATE.render(instruction=seed_prompt(task, inst), output=output.strip()),
                    instances=[Instance("", f"{SCORE_PREFIX} {score}")],
                    lineage=Lineage(stage="meta_task", model="human", prompt_template=prompts.CURATE.id),
                )
            )
    return out


def augmented_task(
    run_id: str, round_index: int, model: str, segment_id: str, segment: str, instruction: str
) -> TaskRecord:
    """The id comes from the segment's own id, so it does not depend on how a stage was split into requests."""
    return TaskRecord(
        id=stable_id(run_id, round_index, "backtranslate", segment_id),
        instruction=instruction,
        instances=[Instance("", segment)],
        lineage=Lineage(
            run_id=run_id,
            round=round_index,
            stage="backtranslate",
            model=model,
            prompt_template=prompts.BACKWARD.id,
            parent_id=segment_id,
        ),
    )


# ---- self-curation: ratings from the model's probabilities ----------------------------------------
@dataclass(frozen=True)
class Pair:
    """What a rater sees: everything the user wrote (instruction + input), and the response."""

    prompt: str
    response: str

    @classmethod
    def of(cls, task: TaskRecord) -> Pair:
        inst = task.instances[0] if task.instances else Instance()
        return cls(seed_prompt(task, inst), inst.output.strip())


def rubric_prompt(renderer: Renderer, pair: Pair) -> str:
    """The rubric as a user turn, rendered as the model sees a task (its chat template, or the plain
    template), and the answer pre-filled up to "Score: "."""
    rubric = TaskRecord(id="rating", instruction=prompts.CURATE.render(instruction=pair.prompt, output=pair.response))
    example = renderer.render(rubric, Instance("", SCORE_PREFIX))
    return example.prompt + example.response + " "


def _normalised(logprobs: list[float]) -> list[float]:
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    return [w / sum(weights) for w in weights]


def _expected(probabilities: list[float]) -> float:
    return sum(int(s) * p for s, p in zip(SCORE_TOKENS, probabilities))


def rubric_ratings(engine: GenerationEngine, renderer: Renderer, pairs: list[Pair]) -> list[tuple[float, float]]:
    """(calibrated, uncalibrated) expected score in [1, 5] for each pair; 0 where the model gives the
    score tokens no finite log-probability."""
    content_free = engine.logprob_of_continuations(
        rubric_prompt(renderer, Pair(CONTENT_FREE, CONTENT_FREE)), list(SCORE_TOKENS)
    )
    out = []
    for pair in pairs:
        logprobs = engine.logprob_of_continuations(rubric_prompt(renderer, pair), list(SCORE_TOKENS))
        if not all(math.isfinite(lp) for lp in logprobs + content_free):
            out.append((0.0, 0.0))
            continue
        calibrated = _normalised([lp - cf for lp, cf in zip(logprobs, content_free)])  # p / p_cf, renormalised
        out.append((_expected(calibrated), _expected(_normalised(logprobs))))
    return out


def pmi_scores(engine: GenerationEngine, renderer: Renderer, pairs: list[Pair]) -> list[float]:
    """NLL(y | content-free prompt) - NLL(y | x) per pair (mean nats per response token, EOS included),
    both rendered as the model sees a task."""

    def rendered(prompt: str, response: str):
        return renderer.render(TaskRecord(id="pair", instruction=prompt), Instance("", response))

    given_x = [rendered(p.prompt, p.response) for p in pairs]
    given_nothing = [rendered(CONTENT_FREE, p.response) for p in pairs]
    nll_x = engine.score_nll([e.prompt for e in given_x], [e.response for e in given_x])
    nll_cf = engine.score_nll([e.prompt for e in given_nothing], [e.response for e in given_nothing])
    return [cf - x for cf, x in zip(nll_cf, nll_x)]


def pmi_to_score(pmi: float) -> float:
    """1 + 4 sigmoid(PMI / PMI_SCALE): monotone, in (1, 5), 3 where the instruction explains nothing."""
    return 1.0 + 4.0 / (1.0 + math.exp(-max(min(pmi / PMI_SCALE, 50.0), -50.0)))


def rate(
    engine: GenerationEngine, tasks: list[TaskRecord], rater: str, prompt_format: PromptFormat = DEFAULT_PROMPT_FORMAT
) -> list[dict[str, float]]:
    """The lineage scores each task gets from the engine's current model: 'curation' (1-5, higher is
    better; 0: unreadable) and the rater's raw figure ('curation_uncalibrated' for rubric,
    'curation_pmi' for likelihood). prompt_format is model.prompt_format, as training renders."""
    renderer = Renderer.for_tokenizer(engine.tokenizer, prompt_format)
    pairs = [Pair.of(t) for t in tasks]
    if rater == "rubric":
        return [
            {"curation": round(c, SCORE_DECIMALS), "curation_uncalibrated": round(u, SCORE_DECIMALS)}
            for c, u in rubric_ratings(engine, renderer, pairs)
        ]
    if rater == "likelihood":
        return [
            {"curation": round(pmi_to_score(pmi), SCORE_DECIMALS), "curation_pmi": round(pmi, SCORE_DECIMALS)}
            for pmi in pmi_scores(engine, renderer, pairs)
        ]
    raise ValueError(f"unknown rater {rater!r}; choose one of {RATERS}")


def rater_id(rater: str) -> str:
    """What a rating's lineage names as its rater: the rubric's template version, or the PMI rule."""
    return f"rubric/{prompts.CURATE.id}" if rater == "rubric" else "likelihood/pmi"


# ---- selection and the rater's control ----------------------------------------------------------
def selection_threshold(scores: list[float], rater: str, k: float, kept_share: float) -> tuple[str, float]:
    """The filter's min_curation_score for a round, and how it was chosen:
    - ("threshold", k): the rubric gave at least one pair k or more (Humpback keeps score >= k);
    - ("rank", cut-off): otherwise, and always for likelihood, whose PMI has no point that means "a 5":
      the best ceil(kept_share * n) pairs are kept (ties at the cut-off too). The cut-off sits half a
      rounding step below that pair's stored score."""
    readable = sorted((s for s in scores if s > 0), reverse=True)
    if not readable:
        return "rank", 5.0  # nothing readable: nothing passes
    if rater == "rubric" and readable[0] >= k:
        return "threshold", float(k)
    keep = max(1, math.ceil(kept_share * len(scores)))
    cutoff = readable[min(keep, len(readable)) - 1]
    return "rank", max(cutoff - 0.5 * 10**-SCORE_DECIMALS, 0.0)


def control_pairs(tasks: list[TaskRecord], n: int, seed: int) -> list[TaskRecord]:
    """n matched seed pairs (a task's instruction and input with its own output) and their shuffled
    twins (the same outputs under another task's instruction and input), for measuring a rater. Tasks
    that are not classification tasks first: their outputs are prose, like the corpus's."""
    usable = [t for t in tasks if t.instances and t.instances[0].output.strip()]
    rng = random.Random(seed)
    rng.shuffle(usable)
    usable.sort(key=lambda t: t.is_classification)  # stable: shuffled within each kind
    chosen = usable[:n]
    if len(chosen) < 2:
        return []
    out = []
    for i, task in enumerate(chosen):
        other = chosen[(i + 1) % len(chosen)]  # a rotation: no output keeps its own task
        output = task.instances[0].output
        for matched, source in ((1.0, task), (0.0, other)):
            out.append(
                TaskRecord(
                    id=f"control-{'matched' if matched else 'shuffled'}-{task.id}",
                    instruction=source.instruction,
                    instances=[Instance(source.instances[0].input, output)],
                    lineage=Lineage(
                        stage="curation_control", model="human", scores={"matched": matched}, parent_id=task.id
                    ),
                )
            )
    return out


def rater_auc(matched: list[float], shuffled: list[float]) -> float | None:
    """ROC AUC of matched over shuffled pairs: P(matched > shuffled) + P(tie) / 2 over all pairs of one
    of each (Mann-Whitney U / (n m)); None without both."""
    if not matched or not shuffled:
        return None
    wins = sum((m > s) + 0.5 * (m == s) for m in matched for s in shuffled)
    return wins / (len(matched) * len(shuffled))
