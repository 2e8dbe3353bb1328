"""Where a job's time goes: cProfile on every process a `qa` job touches, at a 0 ms LM.

Starts a private Redis, the test LM, and the stage and routing workers under cProfile with the
solo pool (so the profiled thread is the one running tasks), runs jobs one at a time from a
profiled client, stops the workers (warm shutdown writes their profiles) and prints, per process,
the CPU time per job and the functions that take it.

    python -m bench.profile [--jobs 200] [--pipeline qa] [--top 25] [--out DIR]
"""

import argparse
import cProfile
import io
import pstats
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from cli.fleet import CELERY, PYTHON, ROOT, client_for, private_redis, test_lm_server, wait_until, worker_env
from contracts.names import ROUTING_QUEUE, stage_queue
from routing.client import Client

CATALOG = [ROOT / "pipelines", ROOT / "bench" / "pipelines"]


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="stagecoach-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    with private_redis() as redis_url, test_lm_server("--latency-ms", "0") as lm_url:
        client = client_for(redis_url, lm_url, CATALOG)
        queues = {f"stage-{s}": stage_queue(s) for s in _stages(client, args.pipeline)}
        queues["routing"] = ROUTING_QUEUE
        procs = [_start(name, queue, worker_env(redis_url, lm_url, CATALOG), out) for name, queue in queues.items()]
        try:
            for name, _ in procs:
                wait_until(lambda n=name: " ready." in _log(out, n), 90, f"worker {name}")  # type: ignore[misc]
            wall = _client_profile(client, args.pipeline, args.jobs, out / "client.prof")
        finally:
            for _, proc in procs:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    print(f"{args.pipeline}: {args.jobs} jobs one at a time, {wall * 1000 / args.jobs:.1f} ms per job (wall, client)")
    for name in ["client", *queues]:
        print(_summary(out / f"{name}.prof", name, args.jobs, args.top))
    print(f"profiles in {out} (open with python -m pstats)")


def _stages(client: Client, pipeline: str) -> list[str]:
    spec = client.runtime.catalog.pipeline(pipeline)
    return [step.stage for step in spec.root.steps] if hasattr(spec.root, "steps") else [spec.root.stage]  # type: ignore[union-attr]


def _start(name: str, queue: str, env: dict[str, str], out: Path) -> tuple[str, subprocess.Popen[bytes]]:
    cmd = [PYTHON, "-m", "cProfile", "-o", str(out / f"{name}.prof"), CELERY, "-A", "workers.app", "worker",
           "-Q", queue, "-n", f"profile-{name}@%h", "--pool", "solo", "--loglevel", "INFO",
           "--without-gossip", "--without-mingle", "--logfile", str(out / f"{name}.log")]
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
