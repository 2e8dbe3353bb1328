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
    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "scale": scale.name,
           "machine": machine(), "scenarios": {r.name: r.summary() for r in results}}
    Path(args.results).write_text(json.dumps(doc, indent=1) + "\n")
    table = render(doc)
    write_docs(Path(args.docs), table)
    print(table, flush=True)


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
