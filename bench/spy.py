"""Where a stage worker's CPU goes under a burst: py-spy samples the Stagecoach stage workers during a burst of
`qa` jobs at a 0 ms LM, then the bare chain's workers during the same burst of bare chains, and prints each
side's samples by part (shares of the samples in which a worker thread was busy; py-spy leaves idle
threads out). Shares are meaningful on a busy machine; absolute rates are not.

    python -m bench.spy [--jobs 400] [--threads 8] [--out DIR]
"""

import argparse
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench.bare import bare_chain, bare_result
from bench.harness import CATALOG, PLUGINS, bare_workers, routing_worker, stage_workers
from cli.fleet import Fleet, client_for, private_redis, test_lm_server, worker_env
from routing.client import Client

STAGES = ["key_terms", "answer"]
PY_SPY = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "py-spy")
# (part, what in a sampled stack marks it), the first match from the innermost frame outwards wins
PARTS = [
    ("Redis round trips (redis-py, kombu's Redis transport)", ("redis/", "kombu/transport/redis")),
    ("JSON and pydantic (envelopes, events, results)", ("pydantic", "json/", "orjson")),
    ("DSPy call (adapter, LM client, HTTP)", ("dspy/", "litellm/", "httpx/", "httpcore/", "openai/")),
    ("Celery and kombu (messages, tracing, events)", ("celery/", "kombu/", "billiard/", "vine/", "amqp/")),
]
OURS = ("workers/", "routing/", "contracts/", "bench/bare.py")
# where in a stage step a sample falls: the outermost of these frames in its stack
STEPS = [
    ("publishing the next message (Celery's chain)", "_dispatch_callbacks_and_chain"),
    ("claim: begin script (1 round trip)", "Ledger.begin ("),
    ("the stage call (contracts, DSPy, LM over HTTP)", "StageRunner.run ("),
    ("the bare task's DSPy call", "BareCall.__call__ ("),
    ("checkpoint and close: save transaction (1 round trip)", "Ledger.save ("),
    ("a step that completed no stage", "Ledger.complete ("),
    ("the lease renewal thread", "workers/lease.py"),
    ("events and the envelope out (outcome, JSON)", "StageExecutor._told ("),
    ("closing: the JobResult and its record (last stage)", "Ledger.closing ("),
    ("handing the envelope on (model_dump)", "hand_on ("),
    ("screening each message (workers/consumer.py, transport)", "workers/consumer.py"),
    ("screening each message (workers/consumer.py, transport)", "workers/transport.py"),
    ("the envelope in (validation)", "inbound ("),
    ("the rest of the task (Stagecoach)", "workers/"),
    ("Celery: the task's tracer (result, state, events)", "celery/app/trace.py"),
    ("Celery/kombu: receiving, acking, the event dispatcher", "celery/"),
]


def part_of(stack: list[str]) -> str:
    for frame in reversed(stack):  # innermost first
        for name, marks in PARTS:
            if any(mark in frame for mark in marks):
                return name
    if any(any(mark in frame for mark in OURS) for frame in stack):
        return "Stagecoach's own Python (or the bare task's)"
    return "other (threads, logging, interpreter)"


def step_of(stack: list[str]) -> str:
    for name, mark in STEPS:
        if any(mark in frame for frame in stack):
            return name
    return "other (threads, logging, interpreter)"


def shares(raw: Path, by: Callable[[list[str]], str] = part_of) -> Counter[str]:
    """Samples by part (`by`) from py-spy's raw (collapsed stacks) output."""
    found: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            found[by(stack.split(";"))] += int(count)
    return found


def record(pids: list[int], seconds: float, out: Path, label: str) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([PY_SPY, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                              "--format", "raw", "--nonblocking", "--output", str(out / f"{label}-{pid}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in pids]


def burst(client: Client, jobs: int, bare: bool) -> float:
    started = time.perf_counter()
    inputs = [{"question": f"Why do barges use the Rhine? ({j} {time.time_ns()})"} for j in range(jobs)]
    if bare:
        for result in [bare_chain(client.app, STAGES, item).apply_async() for item in inputs]:
            bare_result(result, 600)
    else:
        for handle in [client.submit("qa", item) for item in inputs]:
            handle.get(timeout=600)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="stagecoach-spy-"))
    out.mkdir(parents=True, exist_ok=True)
    with private_redis() as url, test_lm_server("--latency-ms", "0") as lm:
        fleet = Fleet(worker_env(url, lm, CATALOG, STAGECOACH_PLUGINS=PLUGINS), out)
        for plan in [*stage_workers(STAGES, args.threads), routing_worker(8), *bare_workers(STAGES, args.threads)]:
            fleet.start(plan.name, plan.queues, pool=plan.pool, concurrency=plan.concurrency)
        try:
            fleet.wait_ready()
            client = client_for(url, lm, CATALOG)
            burst(client, 20, False)
            burst(client, 20, True)
            for label, bare in (("stagecoach", False), ("bare", True)):
                pids = [w.proc.pid for w in fleet.workers if w.name.startswith("bare-" if bare else "stage-")]
                seconds = burst(client, args.jobs, bare)  # how long a burst takes: the recording's length
                spies = record(pids, max(seconds, 2), out, label)
                threading.Thread(target=burst, args=(client, args.jobs * 3, bare), daemon=True).start()
                for spy in spies:
                    spy.wait()
                time.sleep(max(seconds * 2.5, 1))  # the rest of that burst drains
                print(f"{label}: a burst of {args.jobs} jobs took {seconds:.1f} s ({args.jobs / seconds:.0f} jobs/s)")
        finally:
            fleet.stop()
    report(out)


def report(out: Path) -> None:
    for label in ("stagecoach", "bare"):
        for title, by in (("by library", part_of), ("by part of the step", step_of)):
            total: Counter[str] = Counter()
            for raw in out.glob(f"{label}-*.txt"):
                total += shares(raw, by)
            samples = sum(total.values()) or 1
            print(f"\n{label} stage workers, {title}: {samples} busy samples")
            for name, count in total.most_common():
                print(f"  {count / samples:6.1%}  {name}")
    print(f"\nraw profiles in {out}")


if __name__ == "__main__":
    main()
