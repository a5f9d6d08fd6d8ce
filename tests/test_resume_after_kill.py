"""SIGKILL `reinstruct run` in the middle of a round, start it again: the run finishes, committed
stages are not redone, and no record is lost or duplicated."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from services.common.store import RunStore
from tests.tiny import tiny_settings

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent


def _manifest(store_root: Path, run_id: str) -> dict:
    path = store_root / run_id / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {"rounds": {}}


def _run_cli(config_path: Path, run_id: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "ray_jobs.cli", "run", "--config", str(config_path), "--run-id", run_id],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


# Kill as soon as this stage is committed, while the next one is in flight; "shards:" kills inside a
# stage, as soon as its first shard is in while others are in flight.
# (Killing with instance shards in flight also covers "after instruction generation", committed by then.)
KILL_POINTS = [("0", "split"), ("1", "shards:generate_instances"), ("1", "filter")]


def _ledger(store_root: Path, run_id: str, stage: str) -> dict[str, int]:
    """The stage's ledger entries and when each was written (a shard sent again is written again)."""
    folder = store_root / run_id / "round-001" / "shards" / stage
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.rglob("*.json"))} if folder.exists() else {}


def _reached(store_root: Path, run_id: str, round_key: str, after_stage: str) -> bool:
    if after_stage.startswith("shards:"):
        return bool(_ledger(store_root, run_id, after_stage.split(":", 1)[1]))
    return after_stage in _manifest(store_root, run_id)["rounds"].get(round_key, {}).get("stages", {})


@pytest.mark.parametrize("round_key, after_stage", KILL_POINTS, ids=[f"{r}-{s}" for r, s in KILL_POINTS])
def test_sigkill_mid_round_then_resume(tmp_path, builtin_cache, round_key, after_stage):
    store_root = tmp_path / "store"
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(tiny_settings(str(store_root), builtin_cache, 9100, 8100)))
    run_id = "killed"

    first = _run_cli(config_path, run_id)
    deadline = time.time() + 600
    while not _reached(store_root, run_id, round_key, after_stage):
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline, f"{round_key}/{after_stage} never committed"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = _manifest(store_root, run_id)
    shards_in = {}
    if after_stage.startswith("shards:"):
        stage = after_stage.split(":", 1)[1]
        shards_in = _ledger(store_root, run_id, stage)
        assert stage not in before["rounds"]["1"]["stages"], "killed too late: the stage was committed"
    committed_before = {(k, s): v["committed_at"] for k, r in before["rounds"].items() for s, v in r["stages"].items()}
    assert ("1", "promote") not in committed_before

    time.sleep(3)  # let the killed cluster's processes exit and free their ports
    second = _run_cli(config_path, run_id)
    output, _ = second.communicate(timeout=900)
    assert second.returncode == 0, output
    after = _manifest(store_root, run_id)
    assert after["status"] == "succeeded"
    for (k, stage), committed_at in committed_before.items():
        assert after["rounds"][k]["stages"][stage]["committed_at"] == committed_at, f"{k}/{stage} was redone"

    if shards_in:  # the shards that were in are not sent again: their ledger entries are untouched
        stage = after_stage.split(":", 1)[1]
        ledger = _ledger(store_root, run_id, stage)
        assert {name: ledger[name] for name in shards_in} == shards_in
        assert len(ledger) == after["rounds"]["1"]["stages"][stage]["shards"] > len(shards_in)

    store = RunStore(str(store_root))
    stages = after["rounds"]["1"]["stages"]
    for name in ("generate_instructions", "classify", "generate_instances", "segments", "backtranslate", "curate"):
        tasks = store.read_tasks(stages[name]["uri"])
        ids = [t.id for t in tasks]
        assert len(ids) == len(set(ids)) == stages[name]["count"], name
    mix = store.read_tasks(after["rounds"]["1"]["stages"]["train_data"]["uri"])
    assert len({t.id for t in mix}) == len(mix)  # nothing doubled in what the next model learns from
    kept = store.read_tasks(stages["filter"]["kept_uri"]) if stages["filter"]["kept_count"] else []
    rejected = store.read_tasks(stages["filter"]["rejected_uri"]) if stages["filter"]["candidates"] else []
    assert len(kept) + len(rejected) == stages["filter"]["candidates"] == stages["generate_instances"]["count"]
    assert not {t.id for t in kept} & {t.id for t in rejected}
    leftovers = [p for p in (store_root / run_id).rglob("*") if ".tmp-" in p.name]
    assert not leftovers, leftovers


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ}
    return subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_continuous_run_is_watched_stopped_and_resumed_from_the_cli(tmp_path, builtin_cache):
    """`reinstruct run --rounds 0` runs until `reinstruct stop`; `reinstruct status` shows it on the way;
    the same `reinstruct run` goes on from where it stopped."""
    store_root = tmp_path / "store"
    settings = tiny_settings(str(store_root), builtin_cache, 9100, 8100)
    # Patience the first run cannot run out of: only the stop ends it (with patience 1 a round 1 that is
    # not promoted ended it before the stop arrived). The second run has patience 1, so it ends alone.
    settings["loop"] = {"rounds": 0, "bootstrap": True, "patience": 1000, "time_budget_s": 1200}
    config_path = tmp_path / "continuous.yaml"
    config_path.write_text(yaml.safe_dump(settings))
    run_id = "forever"
    flags = ("--config", str(config_path), "--store-root", str(store_root))

    first = _run_cli(config_path, run_id)
    deadline = time.time() + 600
    while "train" not in _manifest(store_root, run_id)["rounds"].get("1", {}).get("stages", {}):
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline, "round 1 never trained"
        time.sleep(0.5)
    status = _cli("status", run_id, *flags)
    assert status.returncode == 0 and "forever: running" in status.stdout, status.stdout + status.stderr
    stopped = _cli("stop", run_id, *flags)
    assert stopped.returncode == 0, stopped.stderr
    in_progress = max(int(k) for k in _manifest(store_root, run_id)["rounds"])
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output
    manifest = _manifest(store_root, run_id)
    assert manifest["status"] == "succeeded" and manifest["stopped_because"] == "stop requested"
    stopped_at = str(max(int(k) for k in manifest["rounds"]))  # the round in progress, or the next just begun
    assert int(stopped_at) in (in_progress, in_progress + 1) and "test" in manifest["rounds"][stopped_at]["stages"]
    status = _cli("status", run_id, *flags)
    assert "stopped because: stop requested" in status.stdout and manifest["promoted_model"] in status.stdout

    time.sleep(3)
    settings["loop"]["patience"] = 1
    config_path.write_text(yaml.safe_dump(settings))
    second = _run_cli(config_path, run_id)  # goes on from the next round, until a round is not promoted
    output, _ = second.communicate(timeout=900)
    assert second.returncode == 0, output
    after = _manifest(store_root, run_id)
    assert (
        after["rounds"]["1"]["stages"]["promote"]["committed_at"]
        == manifest["rounds"]["1"]["stages"]["promote"]["committed_at"]
    )
    last = max(after["rounds"], key=int)
    assert after["stopped_because"] in ("no promotion in 1 rounds in a row", "time budget of 1200s spent")
    if manifest["rounds"][stopped_at]["stages"]["promote"]["promoted"]:  # else it stops at once: patience is spent
        assert int(last) > int(stopped_at)
    assert not after["rounds"][last]["stages"]["promote"]["promoted"] or after["stopped_because"].startswith("time")
