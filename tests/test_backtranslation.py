import re

from services.common.config import BacktranslationConfig
from services.common.engines.base import Completion, ModelSessions, SamplingParams
from services.common.formats import load_seed_tasks
from services.common.records import Instance, Lineage, TaskRecord
from services.common.rendering import Renderer
from services.generator import backtranslation as bt
from services.generator.corpus import BUILTIN_CORPORA, PYDOC_TOPICS, STDLIB, load_segments, sample_segments, segment
from services.generator.service import GeneratorService, RunContext


def test_backward_pairs_and_prompts():
    seeds = [t for t in load_seed_tasks() if t.instances[0].input][:3]
    tasks = bt.backward_tasks(seeds)
    assert len(tasks) == sum(len(t.instances) for t in seeds) and all(t.format == "raw" for t in tasks)
    assert tasks[0].instruction.startswith("Below is a response.")
    assert seeds[0].instances[0].output in tasks[0].instruction
    # the target is the whole prompt side: the instruction and the input it came with
    assert tasks[0].instances[0].output == f" {seeds[0].instruction}\n\n{seeds[0].instances[0].input}"
    assert bt.parse_backward(" Summarize the text.\nmore") == "Summarize the text. more"
    assert (
        bt.parse_backward("Classify the review.\n\nReview: It broke.\n\nextra")
        == "Classify the review.\n\nReview: It broke."
    )
    rubric = bt.rubric_prompt(Renderer(), bt.Pair("Say hi.", "Hi!"))
    assert "5-point scale" in rubric and "<answer>\nHi!\n</answer>" in rubric
    assert rubric.endswith("Output: Score: ")  # the plain template's answer, pre-filled up to "Score: "
    meta = bt.curation_meta_tasks(load_seed_tasks()[:5], seed=0)
    assert meta[0].instances[0].output == "Score: 5" and meta[1].instances[0].output in ("Score: 1", "Score: 2")
    # rendered for training as the rubric rater shows the rubric: the same prompt up to the score
    example = Renderer().render(meta[0], meta[0].instances[0])
    assert example.prompt + example.response == bt.rubric_prompt(Renderer(), bt.Pair.of(load_seed_tasks()[0])) + "5"


def test_corpus_segments_from_stdlib_and_files(tmp_path):
    segments = load_segments(STDLIB, 80, 600)
    assert len(segments) > 500 and all(80 <= len(s) <= 600 for s in segments)
    assert sample_segments(segments, 5, 1) == sample_segments(segments, 5, 1)
    text = tmp_path / "notes.txt"
    text.write_text("short\n\n" + "A long enough paragraph about rivers and their floods. " * 3 + "\n\nx")
    assert len(load_segments([str(text)], 40, 600)) == 1
    assert segment("a\n\n  b  b\n", 1, 10) == ["a", "b b"]


def test_default_corpus_is_prose_that_ships_with_python():
    segments = load_segments(PYDOC_TOPICS, 80, 600)
    assert BacktranslationConfig().corpus == PYDOC_TOPICS and PYDOC_TOPICS in BUILTIN_CORPORA
    assert len(segments) > 200 and all(80 <= len(s) <= 600 for s in segments)
    # prose only: no code, grammar, prompts, list items, version notes or reST markup
    not_prose = re.compile(r">>>|::=|\bdef \w+\(|^\d+\.|Changed in version|\s\*\w[\w ]*\*[\s.,]|\[\d\]")
    leaks = [s for s in segments if not_prose.search(s)]
    assert not leaks, leaks[:3]
    assert all(s.endswith((".", "?", "!", ".)", '."')) for s in segments)
    # a segment opens with the title of the section it comes from, so it says what it explains
    assert any(s.startswith('The "with" statement. The "with" statement is used to wrap') for s in segments)
    assert len(set(segments)) == len(segments)


class EchoEngine(ModelSessions):
    """Writes `answer(prompt)`; scores a response better after the instruction it names."""

    tokenizer = None

    def __init__(self, answer):
        self.answer = answer

    def load(self, model_uri):
        self.model = model_uri

    def generate(self, prompts, params):
        return [Completion(self.answer(p), "stop") for p in prompts]

    def score_nll(self, prompts, responses, max_len=0):
        return [0.5 if "Explain" in p else 1.0 for p in prompts]

    def logprob_of_continuations(self, prompt, continuations):
        return [-1.0 if c == "4" else -3.0 for c in continuations]


def test_backtranslate_and_curate_service():
    service = GeneratorService(EchoEngine(lambda p: " Explain the function.\n"))
    ctx = RunContext("run", 2)
    augmented = service.backtranslate(
        ctx, "backward", [("s0", "Return the sum of a and b."), ("s1", "Open a file.")], SamplingParams()
    )
    assert [t.instruction for t in augmented] == ["Explain the function.", "Explain the function."]
    assert augmented[0].instances[0].output == "Return the sum of a and b."
    assert (augmented[0].lineage.stage, augmented[0].lineage.round, augmented[0].lineage.model) == (
        "backtranslate",
        2,
        "backward",
    )
    # an "instruction" that is the segment's own text is no instruction (and PMI's favourite): dropped
    segment = "Traceback objects. Special read-only attributes point to the execution frame of the current level."
    copying = GeneratorService(EchoEngine(lambda p: " " + segment[:80]))
    assert copying.backtranslate(ctx, "backward", [("s2", segment)], SamplingParams()) == []
    quoting = GeneratorService(EchoEngine(lambda p: ' Explain "Special read-only attributes point to" in Python.'))
    assert len(quoting.backtranslate(ctx, "backward", [("s2", segment)], SamplingParams())) == 1
    by_likelihood = service.curate(ctx, "forward", augmented, "likelihood")
    pmi = 1.0 - 0.5  # NLL after "N/A" minus NLL after the instruction
    assert [t.lineage.scores["curation_pmi"] for t in by_likelihood] == [pmi, pmi]
    assert by_likelihood[0].lineage.scores["curation"] == round(bt.pmi_to_score(pmi), 4) > 3
    assert by_likelihood[0].lineage.verdicts[-2:] == ["curated_by:forward", "rater:likelihood/pmi"]
    # the content-free prompt prefers "4" as much as the pair does: calibrated, nothing is left of it
    by_rubric = service.curate(ctx, "forward", augmented, "rubric")
    assert [t.lineage.scores["curation"] for t in by_rubric] == [3.0, 3.0]
    assert 3.5 < by_rubric[0].lineage.scores["curation_uncalibrated"] < 4.0
    assert by_rubric[0].lineage.verdicts[-1] == "rater:rubric/backtranslation.curate@3"


def test_augmented_data_is_tagged_in_training_prompts():
    task = TaskRecord(
        id="a",
        instruction="Explain the function.",
        instances=[Instance("", "It adds.")],
        lineage=Lineage(stage="backtranslate"),
    )
    seed = TaskRecord(id="s", instruction="Explain the function.", instances=[Instance("", "It adds.")])
    tagged = Renderer(augmented_tag="[augmented]").render(task, task.instances[0])
    assert tagged.prompt.startswith("[augmented]\n") and tagged.response == " It adds."
    assert not Renderer(augmented_tag="[augmented]").render(seed, seed.instances[0]).prompt.startswith("[augmented]")
