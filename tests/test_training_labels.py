"""Labels token by token: prompt masked, response and EOS learned, for both model kinds."""

import random

import pytest

from services.common.models import load_model
from services.common.records import Instance, TaskRecord
from services.common.rendering import IGNORE_INDEX, Example, Renderer, tokenize
from services.trainer.formatting import collate

render = Renderer().render
render_all = Renderer().render_all


@pytest.fixture(scope="module")
def llama(builtin_cache):
    return load_model("builtin:tiny-llama", cache_dir=builtin_cache)


@pytest.fixture(scope="module")
def t5(builtin_cache):
    return load_model("builtin:tiny-t5", cache_dir=builtin_cache)


def test_decoder_only_masks_prompt_and_learns_eos(llama):
    _, tok = llama
    example = Example("Task: Name a colour.\nAnswer:", " Blue sky", "t", "x")
    features = tokenize(example, tok, 128, encoder_decoder=False)
    ids, labels = features["input_ids"], features["labels"]
    assert len(ids) == len(labels)
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    learned = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tok.decode(learned[:-1]) == " Blue sky"
    masked = [i for i, label in zip(ids, labels) if label == IGNORE_INDEX]
    assert tok.decode(masked) == example.prompt
    # the labels equal the ids the model sees wherever they are not masked
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))


def test_first_answer_token_is_in_the_loss(llama):
    """Gluing separately tokenized prompt and response can merge or split tokens at the boundary;
    the labels must start exactly where the response starts in the tokens the model sees."""
    _, tok = llama
    example = Example("Answer:", "Yes", "t", "x")  # no space: the boundary falls inside a pre-token
    features = tokenize(example, tok, 64, encoder_decoder=False)
    ids, labels = features["input_ids"], features["labels"]
    assert tok.decode(ids[:-1]) == "Answer:Yes"
    learned = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX][:-1]
    assert "Yes" in tok.decode(learned)


def test_truncation_keeps_response(llama):
    _, tok = llama
    example = Example("word " * 200, " the answer", "t", "x")
    features = tokenize(example, tok, 32, encoder_decoder=False)
    assert len(features["input_ids"]) == 32
    learned = [i for i, label in zip(features["input_ids"], features["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(learned[:-1]) == " the answer"


def test_encoder_decoder_labels(t5):
    _, tok = t5
    features = tokenize(Example("Task: Name a colour.\nAnswer:", " Blue", "t", "x"), tok, 64, encoder_decoder=True)
    assert tok.decode(features["input_ids"][:-1]) == "Task: Name a colour.\nAnswer:"
    assert features["labels"][-1] == tok.eos_token_id
    assert tok.decode(features["labels"][:-1]) == "Blue"


def test_loss_ignores_prompt_tokens(llama):
    """Changing prompt-side labels cannot change the loss: only response tokens count."""
    import torch

    model, tok = llama
    batch = collate([tokenize(Example("Say hi:", " hi", "t", "x"), tok, 64, False)], tok.pad_token_id)
    with torch.no_grad():
        loss = model(**batch).loss
        n_learned = int((batch["labels"] != IGNORE_INDEX).sum())
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits, shift_labels = logits[0, :-1], batch["labels"][0, 1:]
        manual = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
    assert n_learned == len(tok(" hi", add_special_tokens=False).input_ids) + 1  # response + EOS
    assert torch.allclose(loss, manual, atol=1e-5)


def test_templates_reproducible_and_varied():
    task = TaskRecord(id="a", instruction="Reverse the word.", instances=[Instance("cat", "tac")] * 20)
    first = [e.template_id for e in render_all([task], seed=1)]
    assert first == [e.template_id for e in render_all([task], seed=1)]
    assert len(set(first)) > 1
    assert render(task, task.instances[0]).template_id == "train.with_input.a@1"
    raw = TaskRecord(id="b", instruction="PROMPT", instances=[Instance("", " completion")], format="raw")
    example = render(raw, raw.instances[0], random.Random(0))
    assert (example.prompt, example.response) == ("PROMPT", " completion")
