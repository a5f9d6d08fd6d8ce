import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.engines.base import Completion, ModelSessions, SamplingParams
from services.common.formats import load_seed_tasks
from services.common.records import Instance, Lineage, TaskRecord
from services.common.rendering import Renderer
from services.generator import backtranslation as bt
from services.generator.corpus import STDLIB, load_segments, sample_segments, segment
from services.generator.service import GeneratorService, RunContext


@pytest.mark.parametrize(
    "text, score",
    [
        ("It answers fully.\nScore: 5", 5),
        ("score: 3", 3),
        ("**Score:** 4", 4),
        ("Score: 2 ... wait, Score: 4", 4),
        ("Score: 7", 0),
        ("I would give it four.", 0),
        ("", 0),
    ],
)
def test_rating_parser(text, score):
    assert bt.parse_rating(text) == score


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_rating_parser_never_raises(text):
    assert 0 <= bt.parse_rating(text) <= 5


def test_backward_pairs_and_prompts():
    seeds = load_seed_tasks()[:3]
    tasks = bt.backward_tasks(seeds)
    assert len(tasks) == 3 and all(t.format == "raw" for t in tasks)
    assert tasks[0].instruction.startswith("Below is a response.")
    assert seeds[0].instances[0].output in tasks[0].instruction
    # the target is the whole prompt side: the instruction and the input it came with
    assert tasks[0].instances[0].output == f" {seeds[0].instruction}\n\n{seeds[0].instances[0].input}"
    assert seeds[0].instances[0].input
    assert bt.parse_backward(" Summarize the text.\nmore") == "Summarize the text. more"
    assert (
        bt.parse_backward("Classify the review.\n\nReview: It broke.\n\nextra")
        == "Classify the review.\n\nReview: It broke."
    )
    assert "5-point scale" in bt.build_rating_prompt(
        "Say hi.", "", "Hi!"
    ) and "Score: <rating>" in bt.build_rating_prompt("Say hi.", "", "Hi!")
    meta = bt.curation_meta_tasks(load_seed_tasks()[:5], seed=0)
    assert [bt.parse_rating(t.instances[0].output) for t in meta[:2]][0] == 5
    assert bt.parse_rating(meta[1].instances[0].output) in (1, 2)


def test_corpus_segments_from_stdlib_and_files(tmp_path):
    segments = load_segments(STDLIB, 80, 600)
    assert len(segments) > 500 and all(80 <= len(s) <= 600 for s in segments)
    assert sample_segments(segments, 5, 1) == sample_segments(segments, 5, 1)
    text = tmp_path / "notes.txt"
    text.write_text("short\n\n" + "A long enough paragraph about rivers and their floods. " * 3 + "\n\nx")
    assert len(load_segments([str(text)], 40, 600)) == 1
    assert segment("a\n\n  b  b\n", 1, 10) == ["a", "b b"]


class EchoEngine(ModelSessions):
    def __init__(self, answer):
        self.answer = answer

    def load(self, model_uri):
        self.model = model_uri

    def generate(self, prompts, params):
        return [Completion(self.answer(p), "stop") for p in prompts]


def test_backtranslate_and_curate_service():
    service = GeneratorService(
        EchoEngine(lambda p: " Explain the function.\n" if "Below is a response" in p else "ok\nScore: 4")
    )
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
    curated = service.curate(ctx, "forward", augmented, SamplingParams(temperature=0.0, max_new_tokens=48))
    assert [t.lineage.scores["curation"] for t in curated] == [4.0, 4.0]
    unreadable = GeneratorService(EchoEngine(lambda p: "no idea")).curate(
        ctx, "forward", augmented, SamplingParams(temperature=0.0, max_new_tokens=48)
    )
    assert unreadable[0].lineage.scores["curation"] == 0.0


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
