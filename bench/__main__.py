"""Run the benchmark scenarios, write `bench/results.json` and the table in `docs/benchmarks.md`.

    python -m bench [--smoke] [--only latency,fanout] [--results PATH] [--docs PATH]
"""

import argparse
import importlib
import json
import time
from pathlib import Path
from typing import Any

from bench import SCENARIOS
from bench.harness import FULL, SMOKE, Bench, ScenarioResult
from bench.report import machine, render, write_docs
from cli.fleet import ROOT, private_redis


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    scale = SMOKE if args.smoke else FULL
    results = run(names, scale)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    scenarios = {r.name: {**r.summary(), "measured": date} for r in results}
    if args.only:  # the scenarios not run keep their last figures, with their own date
        scenarios = {**earlier(Path(args.results)), **scenarios}
    doc = {"date": date, "scale": scale.name, "machine": machine(),
           "scenarios": {name: scenarios[name] for name in SCENARIOS if name in scenarios}}
    Path(args.results).write_text(json.dumps(doc, indent=1) + "\n")
    table = render(doc)
    write_docs(Path(args.docs), table)
    print(table, flush=True)


def earlier(results: Path) -> dict[str, Any]:
    """The scenarios of the last results file, each with the date it was measured."""
    if not results.exists():
        return {}
    doc = json.loads(results.read_text())
    return {name: {"measured": doc["date"], **scenario} for name, scenario in doc.get("scenarios", {}).items()}


def run(names: list[str], scale: Any) -> list[ScenarioResult]:
    with private_redis() as redis_url:
        bench = Bench(redis_url)
        results = []
        for name in names:
            started = time.perf_counter()
            result: ScenarioResult = importlib.import_module(SCENARIOS[name]).run(bench, scale)
            print(f"[bench] {name}: {time.perf_counter() - started:.0f} s", flush=True)
            results.append(result)
        return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the harness works, measures nothing")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    return parser


if __name__ == "__main__":
    main()
