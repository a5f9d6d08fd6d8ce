"""deploy/serve.yaml against Ray's own Serve config schema, and every app it names builds."""

import importlib
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from services.api import SERVICER_FUNCTIONS
from services.common.config import ConfigError, config_from_app_args

REPO = Path(__file__).resolve().parent.parent


def test_serve_yaml_validates_and_builds(monkeypatch):
    monkeypatch.chdir(REPO)
    config = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    assert {app.name for app in schema.applications} == {"generator", "filter", "trainer", "evaluator"}
    assert schema.grpc_options.grpc_servicer_functions == SERVICER_FUNCTIONS
    assert schema.grpc_options.port == 9000
    for app in schema.applications:
        module, attr = app.import_path.split(":")
        deployment = getattr(importlib.import_module(module), attr)(app.args)._bound_deployment
        assert deployment.name.lower() == app.name and deployment.num_replicas >= 1  # built with its settings


def test_app_args_merge_and_reject_unknown(monkeypatch):
    monkeypatch.chdir(REPO)
    config = config_from_app_args({"config": "configs/local.yaml", "settings": {"store": {"root": "/data/runs"}}})
    assert config.store.root == "/data/runs" and config.loop.rounds == 2
    assert config_from_app_args(None).store.root == "./runs"
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_app_args({"cfg": "x"})
    with pytest.raises(ConfigError, match="unknown key 'serve.grpc_prt'"):
        config_from_app_args({"settings": {"serve": {"grpc_prt": 1}}})
