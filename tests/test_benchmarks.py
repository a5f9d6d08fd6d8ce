"""Every benchmark in benchmarks/ runs in its quick mode (`--quick`: tiny sizes, seconds; no figure is
asserted), so none can break unseen; a new benchmark is covered by being there. The full runs stay
manual, their figures in the README.

    pytest -m benchmarks"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.benchmarks

# A quick mode takes seconds to about a minute on 2 cores; the margin is for a machine under load.
TIMEOUT_S = 300


def _benchmarks() -> list:
    params = []
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        if path.stem == "__init__":
            continue
        text = path.read_text()
        # so that `-m "not ray"` leaves it out, as the others
        starts_ray = "ray.init(" in text or "local_cluster(" in text
        params.append(pytest.param(path.stem, marks=[pytest.mark.ray] if starts_ray else [], id=path.stem))
    return params


# Every benchmark the README quotes; discovery must find each (a renamed or lost one fails here).
KNOWN = (
    "benchmarks.curation_auc",
    "benchmarks.engines",
    "benchmarks.gate_power",
    "benchmarks.hf_engine",
    "benchmarks.load_filter",
    "benchmarks.packing",
    "benchmarks.rouge_filter",
    "benchmarks.scale_out",
    "benchmarks.scale_out_nodes",
    "benchmarks.training_step",
)


def test_every_known_benchmark_is_discovered() -> None:
    found = {f"benchmarks.{p.values[0]}" for p in _benchmarks()}
    assert set(KNOWN) <= found, sorted(set(KNOWN) - found)


@pytest.mark.parametrize("name", _benchmarks())
def test_quick_mode_runs(name: str) -> None:
    # its own process group: a benchmark past the timeout is killed with the Ray processes it started
    process = subprocess.Popen(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"benchmarks.{name} --quick ran past {TIMEOUT_S} s:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    assert process.returncode == 0, f"benchmarks.{name} --quick exited {process.returncode}:\n{stderr[-4000:]}"
    assert stdout.strip(), f"benchmarks.{name} --quick printed no result (its figures go to stdout)"
