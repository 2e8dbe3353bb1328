"""Fleet scale (issue 22): orchestration vs bare Celery under bursts, the monitor keeping up, Redis bounded,
a deep backlog, and the scaling curve with the monitor's lag.

Parts, each on its own fleet on the harness's private Redis, with a real monitor process reading the fleet
stream (its lag, events not yet counted = the group's lag + pending, sampled every 0.2 s):
- burst: `qa` at a 0 ms LM (CPU-bound: DSPy's adapter and Stagecoach's bookkeeping), bursts of
  10 x scale.burst jobs, Stagecoach vs the bare Celery chain making the same DSPy calls, same workers and
  threads (8 per stage); then per-job latency one job at a time, both sides. Targets >= 0.85x, <= 1.15x.
- monitor: one monitor process's consumer counting a backlog of stage calls (bench/monitor_ingest.py).
- budget: what Redis holds after N jobs once a succeeded job's short-lived records expired (the keep
  settings shortened to seconds here; their defaults say when in production), by key prefix, and the
  keys without a TTL.
- backlog: p50/p99 latency of new `qa` jobs, one at a time, while 100 and then N `bench_single` jobs wait
  in a queue no worker consumes.
- curve: one stage queue (`bench_single`'s solver) served by 1, 2, 4, 8 worker processes (2 threads each)
  at 0 ms and 200 ms, with the monitor's largest lag during each burst; plotted to docs/scale-curve.png.
"""

import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from bench import budget as redis_budget
from bench import monitor_ingest
from bench.bare import bare_chain, bare_result
from bench.harness import (
    Bench,
    Ratio,
    Scale,
    ScenarioResult,
    Series,
    Stack,
    WorkerPlan,
    bare_workers,
    interleave,
    routing_worker,
    run_burst,
    stage_workers,
    timed,
)
from cli.fleet import CELERY, ROOT, free_port, stop_process, wait_until
from contracts.connections import redis_client
from contracts.names import EVENTS_STREAM, MONITOR_GROUP, stage_queue

STAGES = ["key_terms", "answer"]
THREADS = 8
CURVE_PROCESSES = (1, 2, 4, 8)
CURVE_LATENCIES = (0, 200)
SOLVER = stage_queue("solver")
KEEP = 5  # seconds: a succeeded job's records and event stream kept after it ended, in this benchmark only
PNG = ROOT / "docs" / "scale-curve.png"
STAGECOACH = str(Path(CELERY).with_name("stagecoach"))


def run(bench: Bench, scale: Scale) -> ScenarioResult:
    full = scale.name == "full"
    sizes = {"burst": scale.burst * 10, "budget_jobs": 10_000 if full else 20, "backlog": 10_000 if full else 50,
             "latency_jobs": scale.jobs, "curve_burst": max(4, scale.burst // 2),
             "ingest_calls": 20_000 if full else 2_000}
    series: list[Series] = []
    ratios: list[Ratio] = []
    notes: list[str] = []
    _burst_part(bench, scale, sizes, series, ratios, notes)
    ingest = monitor_ingest.measure(bench.redis_url, sizes["ingest_calls"])
    ingest_series = Series("monitor: stage calls/s counted by one process", "calls/s", [[ingest.calls_per_second]])
    series.append(ingest_series)
    ratios.append(Ratio("monitor: stage calls/s one process counts", ingest_series, None, 5000, "higher"))
    notes += _budget_part(bench, sizes["budget_jobs"], series, ratios)
    _backlog_part(bench, sizes, series, ratios)
    curve = _curve_part(bench, scale, sizes["curve_burst"], series, CURVE_PROCESSES if full else (1,))
    notes.append(f"curve (jobs/s, largest monitor lag in events): {curve}")
    _plot(curve, PNG if full else bench.logdir / "scale-curve.png")  # a smoke run leaves the docs' plot alone
    return ScenarioResult("scale", "Fleet scale: bursts vs bare Celery, the monitor, Redis per job, a deep backlog, "
                          "the scaling curve", {**sizes, "threads_per_stage": THREADS, "rounds": scale.rounds,
                                                "keep_seconds_here": KEEP}, series, ratios, notes)


# --- the monitor, as a process, and its lag ----------------------------------------------------------

@contextmanager
def monitor_process(stack: Stack) -> Iterator[str]:
    port = free_port()
    env = {**stack.fleet.env, "STAGECOACH_MONITOR_PORT": str(port), "STAGECOACH_MONITOR_CONSUMER": f"bench-{port}"}
    log = open(stack.fleet.logdir / f"monitor-{port}.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([STAGECOACH, "monitor"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: proc.poll() is None and _healthy(port), 60, "monitor")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)
        log.close()


def _healthy(port: int) -> bool:
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def lag(client: redis.Redis) -> int:
    """Events on the fleet stream the monitor has not counted yet (the group's lag plus its pending)."""
    for group in client.xinfo_groups(EVENTS_STREAM):
        if _text(group["name"]) == MONITOR_GROUP:
            return int(group.get("lag") or 0) + int(group["pending"])
    return int(client.xlen(EVENTS_STREAM))


@contextmanager
def lag_sampler(url: str) -> Iterator[list[float]]:
    """The monitor's lag every 0.2 s while the block runs."""
    client = redis_client(url)
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            samples.append(lag(client))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()
        samples.append(lag(client))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- burst: Stagecoach vs the bare chain at a 0 ms LM ----------------------------------------------------

def _burst_part(bench: Bench, scale: Scale, sizes: dict[str, int], series: list[Series], ratios: list[Ratio],
                notes: list[str]) -> None:
    plan = [*stage_workers(STAGES, THREADS), routing_worker(8), *bare_workers(STAGES, THREADS)]
    burst = sizes["burst"]
    with bench.stack(0, plan) as stack, monitor_process(stack):
        measures: dict[str, Callable[[int], list[float]]] = {
            "burst: stagecoach": lambda r: [burst / timed(lambda: run_burst(stack, "qa", _qa(burst, r)))],
            "burst: bare chain": lambda r: [burst / timed(lambda: _bare_burst(stack, _qa(burst, r)))],
        }
        for measure in measures.values():
            measure(-1)
        with lag_sampler(stack.redis_url) as lags:
            rounds = interleave(scale.rounds, measures)
        one = {"one job: stagecoach": lambda r: [_one(stack, r, j) for j in range(sizes["latency_jobs"])],
               "one job: bare chain": lambda r: [_one_bare(stack, r, j) for j in range(sizes["latency_jobs"])]}
        latency = interleave(scale.rounds, one)
    made = {name: Series(name, "jobs/s", samples) for name, samples in rounds.items()}
    made.update({name: Series(name, "s", samples) for name, samples in latency.items()})
    series += made.values()
    notes.append(f"monitor lag during the bursts (events not yet counted, sampled every 0.2 s): largest "
                 f"{max(lags):.0f}, at the end {lags[-1]:.0f}")
    ratios += [Ratio("burst of qa at 0 ms: stagecoach / bare chain", made["burst: stagecoach"],
                     made["burst: bare chain"], 0.85, "higher"),
               Ratio("one job at a time: stagecoach / bare chain", made["one job: stagecoach"],
                     made["one job: bare chain"], 1.15, "lower")]


def _qa(n: int, round_: int) -> list[dict[str, Any]]:
    return [{"question": f"Why do barges use the Rhine? (round {round_} job {j} {time.time_ns()})"} for j in range(n)]


def _bare_burst(stack: Stack, inputs: list[dict[str, Any]]) -> None:
    results = [bare_chain(stack.client.app, STAGES, item).apply_async() for item in inputs]
    for result in results:
        bare_result(result, 600)


def _one(stack: Stack, round_: int, job: int) -> float:
    return timed(lambda: run_burst(stack, "qa", _qa(1, round_ * 1000 + job)))


def _one_bare(stack: Stack, round_: int, job: int) -> float:
    return timed(lambda: _bare_burst(stack, _qa(1, round_ * 1000 + job)))


# --- Redis per job ---------------------------------------------------------------------------------------

def _budget_part(bench: Bench, jobs: int, series: list[Series], ratios: list[Ratio]) -> list[str]:
    env = {"STAGECOACH_SUCCEEDED_KEEP_SECONDS": str(KEEP), "STAGECOACH_EVENTS_KEEP_SECONDS": str(KEEP)}
    with bench.stack(0, [*stage_workers(STAGES, THREADS), routing_worker(8)], False, **env) as stack, \
            monitor_process(stack):
        for start in range(0, jobs, 1000):
            run_burst(stack, "qa", _qa(min(1000, jobs - start), start))
        client = redis_client(stack.redis_url)
        wait_until(lambda: lag(client) == 0, 300, "the monitor to count every job")
        time.sleep(KEEP + 2)
        found = redis_budget.measure(client)
    per_job = found.per_job(jobs)
    job_bytes = sum(v for p, v in per_job.items() if not p.startswith("stagecoach:monitor:"))
    trace_bytes = sum(v for p, v in per_job.items() if p.startswith("stagecoach:monitor:"))
    made = Series("Redis bytes per succeeded job after its records expired (result, status)", "bytes",
                  [[job_bytes]])
    traces = Series("Redis bytes per job of monitor traces (the latest STAGECOACH_MONITOR_TRACES jobs)", "bytes",
                    [[trace_bytes]])
    job_keys = sum(u.keys for p, u in found.by_prefix.items() if "<id>" in p)
    no_ttl = sum(n for p, n in found.without_ttl().items() if "<id>" in p)
    with_ttl = Series("share of the jobs' keys that have a TTL", "share", [[(job_keys - no_ttl) / max(job_keys, 1)]])
    series += [made, traces, with_ttl]
    ratios += [Ratio("Redis bytes a succeeded job leaves (result + status)", made, None, 4096, "lower"),
               Ratio("share of the jobs' keys with a TTL", with_ttl, None, 1.0, "higher")]
    return [f"Redis after {jobs} qa jobs, by prefix:\n{found.table(jobs)}",
            f"keys without a TTL (fixed structures, not per job): {found.without_ttl()}"]


# --- a deep backlog --------------------------------------------------------------------------------------

def _backlog_part(bench: Bench, sizes: dict[str, int], series: list[Series], ratios: list[Ratio]) -> None:
    plan = [*stage_workers(STAGES, THREADS), routing_worker(8), WorkerPlan("solver-0", [SOLVER], concurrency=2)]
    with bench.stack(0, plan) as stack, monitor_process(stack):
        _consumers(stack, ["solver-0"], 0)  # the backlog's queue: nobody consumes it
        measured: dict[str, list[float]] = {}
        queued = 0
        for depth in (100, sizes["backlog"]):
            _fill(stack, depth - queued)
            queued = depth
            measured[f"latency of a new qa job, {depth} jobs queued"] = [
                _one(stack, depth, j) for j in range(max(sizes["latency_jobs"] * 2, 10))]
    made = {name: Series(name, "s", [samples]) for name, samples in measured.items()}
    series += made.values()
    small, deep = made.values()
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        ratios.append(Ratio(f"{label} latency of a new job: {sizes['backlog']} queued / 100 queued",
                            _quantile_series(deep, q), _quantile_series(small, q), None, "lower"))


def _quantile_series(series: Series, q: float) -> Series:
    values = sorted(series.samples)
    return Series(series.label, series.unit, [[values[min(len(values) - 1, int(q * len(values)))]]])


def _fill(stack: Stack, jobs: int) -> None:
    for j in range(jobs):
        stack.client.submit("bench_single", {"question": f"Backlog {j} {time.time_ns()}?", "document": "-"})


def _consumers(stack: Stack, workers: list[str], active: int) -> None:
    """The first `active` of `workers` consume the solver queue; the others stop consuming it."""
    import socket
    control = stack.client.app.control
    host = socket.gethostname()
    for index, name in enumerate(workers):
        destination = [f"{name}@{host}"]
        if index < active:
            control.add_consumer(SOLVER, destination=destination, reply=True, timeout=5)
        else:
            control.cancel_consumer(SOLVER, destination=destination, reply=True, timeout=5)
    time.sleep(0.2)


# --- the curve -------------------------------------------------------------------------------------------

Curve = dict[str, list[tuple[int, float, int]]]  # label -> (processes, jobs/s, largest monitor lag)


def _curve_part(bench: Bench, scale: Scale, burst: int, series: list[Series], counts: tuple[int, ...]) -> Curve:
    names = [f"solver-{i}" for i in range(max(counts))]
    plan = [*(WorkerPlan(n, [SOLVER], concurrency=2) for n in names), routing_worker(8)]
    curve: Curve = {}
    for latency in CURVE_LATENCIES:
        points = []
        with bench.stack(latency, plan) as stack, monitor_process(stack):
            for processes in counts:
                _consumers(stack, names, processes)
                with lag_sampler(stack.redis_url) as lags:
                    rates = [burst / _timed_solver(stack, burst, f"{processes}/{r}")
                             for r in range(max(1, scale.rounds // 2))]
                rate = statistics.median(rates)
                series.append(Series(f"curve {latency} ms LM: {processes} processes", "jobs/s", [rates]))
                points.append((processes, rate, int(max(lags))))
        curve[f"{latency} ms LM"] = points
    return curve


def _timed_solver(stack: Stack, jobs: int, tag: str) -> float:
    return timed(lambda: _solver_burst(stack, jobs, tag))


def _solver_burst(stack: Stack, jobs: int, tag: str) -> None:
    run_burst(stack, "bench_single",
                      [{"question": f"What moves barges? ({tag}/{j} {time.time_ns()})", "document": "-"}
                       for j in range(jobs)])


def _plot(curve: Curve, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, points in curve.items():
        xs = [p for p, _, _ in points]
        left.plot(xs, [rate for _, rate, _ in points], marker="o", label=label)
        right.plot(xs, [lagged for _, _, lagged in points], marker="o", label=label)
    for axis, title, unit in ((left, "throughput, one stage queue", "jobs/s"),
                              (right, "monitor lag (largest during the burst)", "events behind")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(xs, [str(p) for p in xs])
        axis.set_xlabel("worker processes (2 threads each)")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)
