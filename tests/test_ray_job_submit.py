"""`ray job submit` of the loop driver against a real `ray start --head` cluster: SUCCEEDED, and its
rounds are in the run store."""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.tiny import tiny_settings

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture
def head_node(tmp_path):
    # token auth, as a user's `ray start` cluster has it: the head and the CLI calls share the token
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    # Its own session dir (no clash with other local clusters), short: Unix socket paths max 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")
    from services.serving import wait_for_previous_cluster

    wait_for_previous_cluster()  # a killed cluster's agent may still hold its port
    started = subprocess.run(
        [
            RAY,
            "start",
            "--head",
            "--port=6390",
            "--dashboard-port=8266",
            "--num-cpus=4",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield env, "http://127.0.0.1:8266"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_runs_the_loop(tmp_path, head_node, builtin_cache):
    env, address = head_node
    store_root = tmp_path / "store"
    # One machine here, so an absolute path reaches the job; on a cluster it would be a shared path.
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(tiny_settings(str(store_root), builtin_cache, 9300, 8300)))
    for _ in range(12):  # the head's job agent needs a few seconds after `ray start` returns
        submitted = subprocess.run(
            [
                RAY,
                "job",
                "submit",
                "--address",
                address,
                "--working-dir",
                ".",
                "--submission-id",
                "loop-test",
                # this test's interpreter: `python` on PATH need not be the one with reinstruct installed
                "--",
                sys.executable,
                "-m",
                "ray_jobs.self_improve",
                "--config",
                str(config_path),
                "--run-id",
                "job",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if "No available agent to submit job" not in submitted.stdout + submitted.stderr:
            break
        time.sleep(5)
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    status = subprocess.run(
        [RAY, "job", "status", "--address", address, "loop-test"], env=env, capture_output=True, text=True, timeout=120
    )
    assert status.returncode == 0 and "Job 'loop-test' succeeded" in status.stdout, status.stdout + status.stderr
    # the job API refuses a caller without the cluster's token
    anonymous = subprocess.run(
        [RAY, "job", "list", "--address", address],
        env={**env, "RAY_AUTH_TOKEN": "not-the-token"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert anonymous.returncode != 0, anonymous.stdout
    manifest = json.loads((store_root / "job" / "manifest.json").read_text())
    assert manifest["status"] == "succeeded"
    assert set(manifest["rounds"]) == {"0", "1"}
    assert (store_root / "job" / "round-001" / "model" / "model.safetensors").exists()
