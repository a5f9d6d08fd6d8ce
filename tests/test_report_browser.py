"""The report opens in a real browser (headless Chromium) with every section; skipped without one."""

import shutil
import struct
import subprocess

import pytest

from ray_jobs.report import SECTIONS, write_report
from services.common.store import RunStore
from tests.tiny import fill_example_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium)")
def test_report_renders_in_chromium(tmp_path):
    store = RunStore(str(tmp_path))
    fill_example_run(store)
    page = store.resolve(write_report(store, "r"))
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", f"file://{page}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    for section in SECTIONS:
        assert f'id="{section}"' in dom.stdout
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={shot}",
            "--window-size=1000,3000",
            f"file://{page}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    width, height = struct.unpack(">II", shot.read_bytes()[16:24])
    assert (width, height) == (1000, 3000)
