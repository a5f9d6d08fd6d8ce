"""Writes helm/reinstruct/values.schema.json: the chart's values, with the `reinstruct` section taken
from the typed config (services/common/config.py), so a wrong key fails at `helm install`, not in a pod.

    python deploy/make_values_schema.py        # tests/test_helm_chart.py fails when it is stale
"""

from __future__ import annotations

import json
from pathlib import Path

from services.common.config import ReinstructConfig

CHART = Path(__file__).resolve().parent.parent / "helm" / "reinstruct"

_RESOURCES = {
    "type": "object",
    "properties": {"requests": {"type": "object"}, "limits": {"type": "object"}},
    "additionalProperties": False,
}


def _object(properties: dict, required: list[str] | None = None) -> dict:
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def _workers(gpu: bool) -> dict:
    properties = {
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "resources": _RESOURCES,
        # custom Ray resources the group's workers advertise (rayStartParams resources)
        "rayResources": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
    }
    if gpu:
        properties.update(
            enabled={"type": "boolean"},
            gpusPerWorker={"type": "integer", "minimum": 1},
            nodeSelector={"type": "object"},
            tolerations={"type": "array"},
        )
    return _object(properties, ["replicas", "minReplicas", "maxReplicas", "resources"])


def values_schema() -> dict:
    config_schema = ReinstructConfig.model_json_schema()
    defs = config_schema.pop("$defs")
    config_schema.pop("required", None)
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "reinstruct chart values",
        "$defs": defs,
        **_object(
            {
                "image": _object(
                    {
                        "repository": {"type": "string", "minLength": 1},
                        "tag": {"type": "string", "minLength": 1},
                        "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                    },
                    ["repository", "tag"],
                ),
                "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
                "rayAuth": _object(
                    {"enabled": {"type": "boolean"}, "existingSecret": {"type": "string"}, "token": {"type": "string"}}
                ),
                "apiAuth": _object(
                    {"enabled": {"type": "boolean"}, "existingSecret": {"type": "string"}, "token": {"type": "string"}}
                ),
                "store": _object(
                    {
                        "mountPath": {"type": "string", "pattern": "^/"},
                        "root": {"type": "string", "minLength": 1},
                        "pvc": _object(
                            {
                                "enabled": {"type": "boolean"},
                                "existingClaim": {"type": "string"},
                                "size": {"type": "string", "pattern": r"^\d+(Mi|Gi|Ti)$"},
                                "storageClass": {"type": "string"},
                                "accessMode": {"enum": ["ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"]},
                            }
                        ),
                    },
                    ["root"],
                ),
                "serve": _object(
                    {
                        "grpcPort": {"type": "integer", "minimum": 1, "maximum": 65535},
                        "httpPort": {"type": "integer", "minimum": 1, "maximum": 65535},
                        "maxRequestMiB": {"type": "integer", "minimum": 1, "maximum": 2000},
                    }
                ),
                "reinstruct": config_schema,
                "head": _object({"resources": _RESOURCES}),
                "cpuWorkers": _workers(gpu=False),
                "gpuWorkers": _workers(gpu=True),
                "loop": _object(
                    {
                        "enabled": {"type": "boolean"},
                        "mode": {"enum": ["service", "own-cluster"]},
                        "runId": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$"},
                        "rounds": {"type": "integer", "minimum": 1},
                        "shutdownAfterJobFinishes": {"type": "boolean"},
                        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                    }
                ),
            },
            ["image", "store", "serve"],
        ),
    }


def render() -> str:
    return json.dumps(values_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    (CHART / "values.schema.json").write_text(render())
    print(f"wrote {CHART / 'values.schema.json'}")
