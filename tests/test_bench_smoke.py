"""The benchmark harness keeps working: every scenario runs at tiny sizes and reports sane numbers.

Speed is never asserted here (shared machines are noisy); only that each scenario in
`bench.SCENARIOS` produced positive, finite samples and ratios, and that the docs table was written.
"""

import json
import math
import subprocess
from pathlib import Path

import pytest

from bench import SCENARIOS
from bench.report import BEGIN, END
from cli.fleet import PYTHON, ROOT


@pytest.mark.timeout(2400)  # the scenarios' fleets start one after another, then the real local model (answers)
def test_bench_smoke_writes_every_scenario(tmp_path: Path) -> None:
    results, docs = tmp_path / "results.json", tmp_path / "benchmarks.md"
    run = subprocess.run([PYTHON, "-m", "bench", "--smoke", "--results", str(results), "--docs", str(docs)],
                         cwd=ROOT, capture_output=True, text=True, timeout=2300)
    assert run.returncode == 0, run.stderr[-4000:]
    doc = json.loads(results.read_text())
    assert set(doc["scenarios"]) == set(SCENARIOS)
    assert doc["machine"]["cpus"] >= 1 and doc["date"]
    for name, scenario in doc["scenarios"].items():
        assert scenario["series"] and scenario["ratios"], name
        for label, series in scenario["series"].items():
            assert series["n"] > 0, (name, label)
            zero_ok = series["unit"] == "calls"  # a count (a rerun's LM calls) may be 0
            assert all(_sane(series[k], zero_ok) for k in ("median", "p25", "p75", "min", "max")), (name, label, series)
        for ratio in scenario["ratios"]:  # an accuracy of the real model may be 0 at smoke sizes, not below
            zero_ok = ratio["better"] == "lower" or name == "answers"
            assert _sane(ratio["value"], zero_ok), (name, ratio)
    text = docs.read_text()
    assert BEGIN in text and END in text
    assert all(f"### {name}:" in text for name in SCENARIOS)


def _sane(value: float, zero_ok: bool = False) -> bool:
    return math.isfinite(value) and (value > 0 or (zero_ok and value == 0))
