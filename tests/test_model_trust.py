"""Models the operator configures are trusted; a model URI from a client stays in the run store."""

import os

import pytest

from services.common.config import parse_config
from services.common.store import RunStore
from services.common.validation import RequestError, TrustedModels, check_model_uri


@pytest.fixture
def setup(tmp_path):
    store = RunStore(str(tmp_path / "store"))
    outside = tmp_path / "checkpoints" / "mine"
    outside.mkdir(parents=True)
    config = parse_config(
        {
            "model": {"base": str(outside), "allowed_dirs": [str(tmp_path / "shared-models")]},
            "evaluation": {"judge_model": str(tmp_path / "judge")},
            "store": {"root": store.root},
        }
    )
    return store, TrustedModels.from_config(config), tmp_path


def test_operator_models_outside_the_store_are_allowed(setup):
    store, trusted, tmp = setup
    assert check_model_uri(str(tmp / "checkpoints" / "mine"), store, "base_model_uri", trusted) == str(
        tmp / "checkpoints" / "mine"
    )
    assert check_model_uri(str(tmp / "judge"), store, "judge_model_uri", trusted) == str(tmp / "judge")
    assert check_model_uri(str(tmp / "shared-models" / "round-3"), store, trusted=trusted)
    assert check_model_uri("builtin:smollm2-135m", store, trusted=trusted) == "builtin:smollm2-135m"


@pytest.mark.parametrize("uri", ["/etc", "checkpoints/../../x", "s3://bucket/model", "gpt2/../../etc"])
def test_client_models_elsewhere_are_refused_naming_the_field(setup, uri):
    store, trusted, _ = setup
    with pytest.raises(RequestError) as info:
        check_model_uri(uri, store, "model_uri", trusted)
    assert str(info.value).startswith("model_uri: ")


def test_relative_uris_resolve_inside_the_store(setup):
    """A relative URI means a path in the store, never one relative to a replica's working directory."""
    store, trusted, tmp = setup
    os.makedirs(os.path.join(store.root, "outside", "model"))
    with open(os.path.join(store.root, "outside", "model", "config.json"), "w") as handle:
        handle.write("{}")
    assert check_model_uri("outside/model", store, trusted=trusted) == os.path.join(store.root, "outside", "model")
    with pytest.raises(RequestError, match="no checkpoint"):  # a bare hub id never reaches the hub
        check_model_uri("gpt2", store, trusted=trusted)
    os.symlink(tmp / "checkpoints", os.path.join(store.root, "escape"))
    with pytest.raises(RequestError, match="outside the run store"):
        check_model_uri("escape/mine", store, trusted=trusted)
    with pytest.raises(RequestError, match="unknown preset"):
        check_model_uri("builtin:nope", store, trusted=trusted)


def test_serving_beyond_loopback_needs_a_token(monkeypatch):
    from services.serving import _refuse_open_without_token

    monkeypatch.delenv("REINSTRUCT_API_TOKEN", raising=False)
    _refuse_open_without_token("127.0.0.1")
    _refuse_open_without_token("localhost")
    with pytest.raises(RuntimeError, match="REINSTRUCT_API_TOKEN is not set"):
        _refuse_open_without_token("0.0.0.0")
    monkeypatch.setenv("REINSTRUCT_API_TOKEN", "s3cret")
    _refuse_open_without_token("0.0.0.0")
