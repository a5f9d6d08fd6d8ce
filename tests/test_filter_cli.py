import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_filter_cli_keeps_order_and_reports(tmp_path):
    rows = [
        {"instruction": "Write a short poem about the ocean waves.", "input": "", "output": "Waves roll in."},
        {"instruction": "Draw a map of your neighbourhood.", "input": "", "output": "..."},
        {"instruction": "Write a short poem about the ocean waves!", "input": "", "output": "Blue water."},
        {"instruction": "List three uses of baking soda.", "input": "", "output": "Cleaning, baking, deodorizing."},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"instruction": "List three uses of baking soda at home."}) + "\n")
    out, rejected = tmp_path / "out.jsonl", tmp_path / "rej.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_jobs.cli",
            "filter",
            str(src),
            "-o",
            str(out),
            "--pool",
            str(pool),
            "--rejected",
            str(rejected),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert kept == [rows[0]]
    reasons = [json.loads(line)["_reinstruct"]["reasons"][0] for line in rejected.read_text().splitlines()]
    assert reasons == ["blacklisted:map", "rouge_l_too_similar", "rouge_l_too_similar"]
    assert "kept 1 of 4" in done.stdout


def test_filter_cli_instruction_only_and_bad_file(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps({"instruction": "Name four planets of the solar system."})
        + "\n"
        + json.dumps({"text": "no instruction"})
        + "\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", "filter", str(src), "-o", str(tmp_path / "o.jsonl")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "in.jsonl:2: field 'instruction'" in done.stdout.replace("\n", "")
    src.write_text(json.dumps({"instruction": "Name four planets of the solar system."}) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", "filter", str(src), "-o", str(tmp_path / "o.jsonl")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "kept 1 of 1" in done.stdout


def test_filter_cli_kept_seed_record_shows_only_surviving_instances(tmp_path):
    row = {
        "id": "t1",
        "instruction": "Give the capital of the country.",
        "is_classification": False,
        "instances": [
            {"input": "France", "output": "Paris"},
            {"input": "Spain", "output": "Madrid"},
            {"input": "Peru", "output": ""},
            {"input": "Chile", "output": "Chile"},
        ],
    }
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps(row) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", "filter", str(src), "-o", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    kept = json.loads(out.read_text())
    assert kept["instances"] == row["instances"][:2] and kept["id"] == "t1"


LONG_ANSWER = "The three longest rivers of Africa are the Nile, the Congo and the Niger, in that order of length."


def test_filter_cli_rejects_an_empty_instruction_and_switches_rules_off(tmp_path):
    rows = [
        {"instruction": "", "input": "", "output": "orphan output"},
        {"instruction": "Draw a map of your neighbourhood.", "input": "", "output": "A map."},
        {"instruction": "Name three rivers in Africa.", "input": "", "output": LONG_ANSWER},
    ]
    src, out, rejected = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "rej.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"instruction": "Name rivers.", "input": "", "output": LONG_ANSWER}) + "\n")

    def run(*flags):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "ray_jobs.cli",
                "filter",
                str(src),
                "-o",
                str(out),
                "--rejected",
                str(rejected),
                *flags,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        reasons = [json.loads(line)["_reinstruct"]["reasons"][0] for line in rejected.read_text().splitlines()]
        return [json.loads(line)["instruction"] for line in out.read_text().splitlines()], reasons

    assert run() == ([rows[2]["instruction"]], ["empty_instruction", "blacklisted:map"])
    assert run("--no-instruction-rules") == ([r["instruction"] for r in rows[1:]], ["empty_instruction"])
    kept, reasons = run("--decontaminate-against", str(evals))  # shares a 13-token run with the evaluation set
    assert kept == [] and reasons == ["empty_instruction", "blacklisted:map", "contaminated"]
