"""`reinstruct serve` deploys the four apps, answers over gRPC, and on Ctrl-C shuts down what it started."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.tiny import tiny_settings

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parent.parent


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_serve_until_interrupted(tmp_path, builtin_cache):
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(tiny_settings(str(tmp_path / "store"), builtin_cache, 9700, 8700)))
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "ray_jobs.cli", "serve", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 300
        while not any("serving" in line for line in lines):
            assert server.poll() is None, "".join(lines)
            assert time.time() < deadline, "the apps never came up"
            time.sleep(0.5)
        assert _listening(9700)
        channel = grpc.insecure_channel("127.0.0.1:9700")
        services = set()
        while time.time() < deadline and "reinstruct.v1.Evaluator" not in services:
            try:
                services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
            except grpc.RpcError:
                time.sleep(0.5)
        assert {
            "reinstruct.v1.Generator",
            "reinstruct.v1.Filter",
            "reinstruct.v1.Trainer",
            "reinstruct.v1.Evaluator",
        } <= services
        channel.close()
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)
        reader.join(10)
        output = "".join(lines)
        assert server.returncode == 0, output
        assert "shutting down what this command started" in output
        assert not _listening(9700)
    finally:
        if server.poll() is None:
            server.kill()
