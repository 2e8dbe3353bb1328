"""Where a job's time goes: cProfile on every process a `qa` job touches, at a 0 ms LM.

Starts a private Redis, the test LM, and the stage and routing workers under cProfile with the
solo pool (so the profiled thread is the one running tasks), plus one worker per task of the
bare Celery chain (bench/bare.py) making the same DSPy calls. Runs jobs one at a time from a
profiled client, then as many bare chains, stops the workers (warm shutdown writes their
profiles) and prints a table comparing, per stage, the time a Stagecoach stage task and a bare
task take inside the worker (all of Celery's handling, the task body, the DSPy call), then per
process the functions that take the time.

    python -m bench.profile [--jobs 200] [--pipeline qa] [--top 25] [--out DIR]
"""

import argparse
import cProfile
import io
import pstats
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from bench.bare import bare_chain, bare_result
from bench.harness import CATALOG, PLUGINS
from cli.fleet import CELERY, PYTHON, ROOT, client_for, private_redis, test_lm_server, wait_until, worker_env
from cli.workercmd import WorkerCommand
from contracts.names import ROUTING_QUEUE, bench_bare_task, stage_queue
from routing.client import Client


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="stagecoach-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    with private_redis() as redis_url, test_lm_server("--latency-ms", "0") as lm_url:
        client = client_for(redis_url, lm_url, CATALOG)
        stages = _stages(client, args.pipeline)
        queues = {f"stage-{s}": stage_queue(s) for s in stages}
        queues["routing"] = ROUTING_QUEUE
        queues.update({f"bare-{s}": bench_bare_task(s) for s in stages})
        env = worker_env(redis_url, lm_url, CATALOG, STAGECOACH_PLUGINS=PLUGINS)
        procs = [_start(name, queue, env, out) for name, queue in queues.items()]
        try:
            for name, _ in procs:
                wait_until(lambda n=name: " ready." in _log(out, n), 90, f"worker {name}")  # type: ignore[misc]
            wall = _client_profile(client, args.pipeline, args.jobs, out / "client.prof")
            bare_wall = _bare_run(client, stages, args.jobs)
        finally:
            for _, proc in procs:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    print(f"{args.pipeline}: {args.jobs} jobs one at a time, {wall * 1000 / args.jobs:.1f} ms per job (wall, client, "
          f"profiled); bare chain {bare_wall * 1000 / args.jobs:.1f} ms")
    print(_comparison(out, stages))
    for name in ["client", *queues]:
        print(_summary(out / f"{name}.prof", name, args.jobs, args.top))
    print(f"profiles in {out} (open with python -m pstats)")


def _bare_run(client: Client, stages: list[str], jobs: int) -> float:
    for index in range(5):
        bare_result(bare_chain(client.app, stages, {"question": f"warm-up {index}"}).apply_async(), 60)
    started = time.perf_counter()
    for index in range(jobs):
        bare_result(bare_chain(client.app, stages, {"question": f"What moves barges on the Rhine? ({index})"})
                    .apply_async(), 60)
    return time.perf_counter() - started


# (label, function pattern): where a task's time goes inside a worker, cumulative, per task
PARTS = [("in the worker", r"celery/app/trace.py:\d+\(trace_task\)"),
         ("task body", r"celery/app/trace.py:\d+\(__protected_call__\)"),
         ("DSPy call", r"dspy/primitives/module.py:\d+\(__call__\)|dspy/predict/predict.py:\d+\(__call__\)")]
# what a Stagecoach stage task does beyond the bare task, each part cumulative per call
OURS = [("claim: begin script (1 round trip)", r"workers/ledger.py:\d+\(begin\)"),
        ("checkpoint: save pipeline (1 round trip)", r"workers/ledger.py:\d+\(save\)"),
        # under the profiler's solo pool the call runs on the task's thread: no deadline thread here
        ("stage runner (contracts, DSPy call)", r"workers/stage.py:\d+\(run\)"),
        ("  of which the DSPy call", r"workers/stage.py:\d+\(_predict\)"),
        ("envelope and node validation", r"workers/tasks.py:\d+\(inbound\)"),
        ("monitor event (queued for the sender thread)", r"workers/outcome.py:\d+\(_report\)"),
        ("closing the job: JobResult and result record (last stage)", r"workers/ledger.py:\d+\(closing\)"),
        ("closing the job: job-finished event (last stage)", r"workers/ledger.py:\d+\(announce\)")]


def _comparison(out: Path, stages: list[str]) -> str:
    """Per stage: ms per task in the Stagecoach stage worker and in the bare one, by part; then the
    parts only a Stagecoach stage task has."""
    lines = ["", "ms per task, profiled (cProfile slows Python code about 2x; compare the columns):",
             "| stage | part | stagecoach | bare | difference |", "|---|---|---|---|---|"]
    for stage in stages:
        ours, bare = _parts(out / f"stage-{stage}.prof", PARTS), _parts(out / f"bare-{stage}.prof", PARTS)
        for label, _ in PARTS:
            a, b = ours.get(label), bare.get(label)
            if a is not None and b is not None:
                lines.append(f"| {stage} | {label} | {a:.2f} | {b:.2f} | {a - b:+.2f} |")
    lines += ["", "a Stagecoach stage task's own parts, ms per call, profiled:", "| stage | part | ms |",
              "|---|---|---|"]
    for stage in stages:
        for label, value in _parts(out / f"stage-{stage}.prof", OURS).items():
            lines.append(f"| {stage} | {label} | {value:.2f} |")
    return "\n".join(lines)


def _parts(path: Path, parts: list[tuple[str, str]]) -> dict[str, float]:
    """ms per call of each part's function (its outermost match) in one process's profile."""
    if not path.exists():
        return {}
    raw = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    found: dict[str, float] = {}
    for label, pattern in parts:
        hits = [(nc, ct) for (file, line, func), (_, nc, _, ct, _) in raw.items()
                if re.search(pattern, f"{file}:{line}({func})")]
        if hits:  # the outermost match: the one with the most cumulative time
            calls, cumulative = max(hits, key=lambda h: h[1])
            found[label] = cumulative * 1000 / max(calls, 1)
    return found


def _stages(client: Client, pipeline: str) -> list[str]:
    spec = client.runtime.catalog.pipeline(pipeline)
    return [step.stage for step in spec.root.steps] if hasattr(spec.root, "steps") else [spec.root.stage]  # type: ignore[union-attr]


def _start(name: str, queue: str, env: dict[str, str], out: Path) -> tuple[str, subprocess.Popen[bytes]]:
    worker = WorkerCommand(f"profile-{name}", (queue,), pool="solo", concurrency=1, program=CELERY,
                           logfile=str(out / f"{name}.log"))
    cmd = [PYTHON, "-m", "cProfile", "-o", str(out / f"{name}.prof"), *worker.argv()]
    return name, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _log(out: Path, name: str) -> str:
    path = out / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _client_profile(client: Client, pipeline: str, jobs: int, path: Path) -> float:
    for index in range(5):  # warm-up: modules loaded, connections open
        client.submit(pipeline, {"question": f"warm-up {index}"}).get(timeout=60)
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    for index in range(jobs):
        client.submit(pipeline, {"question": f"What moves barges on the Rhine? ({index})"}).get(timeout=60)
    profile.disable()
    wall = time.perf_counter() - started
    profile.dump_stats(str(path))
    return wall


def _summary(path: Path, name: str, jobs: int, top: int) -> str:
    if not path.exists():
        return f"\n== {name}: no profile written"
    buffer = io.StringIO()
    stats = pstats.Stats(str(path), stream=buffer)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    total = stats.total_tt  # type: ignore[attr-defined]
    return f"\n== {name}: {total:.2f} s profiled CPU+wait, {total * 1000 / jobs:.1f} ms per job\n{buffer.getvalue()}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--pipeline", default="qa")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default="")
    return parser


if __name__ == "__main__":
    main()
