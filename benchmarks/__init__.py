"""Benchmarks: speed as ratios measured in one run. The full runs are manual (their figures are in the
README); `--quick` runs each at tiny sizes in seconds, as tests/test_benchmarks.py does on every
submission, so a benchmark cannot break unseen. A quick run's figures mean nothing."""

from __future__ import annotations

import argparse


def parse_args(parser: argparse.ArgumentParser, quick: dict) -> argparse.Namespace:
    """Adds --quick: the sizes in `quick` replace the parser's defaults (flags given still win)."""
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes, seconds, figures meaningless: {quick}")
    if parser.parse_known_args()[0].quick:
        parser.set_defaults(**quick)
    return parser.parse_args()
