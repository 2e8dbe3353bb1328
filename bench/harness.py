"""What every benchmark scenario shares: sizes, samples, ratios, and the services it runs against.

A scenario is a module with `run(bench, scale) -> ScenarioResult` (see `bench.SCENARIOS`). It asks
`bench.stack(...)` for a test LM at a fixed latency and a fleet of worker subprocesses on the
harness's private Redis (the shared stage cache off unless the scenario measures it), runs its
series interleaved in rounds (so a busy shared machine slows every series alike), and reports
samples; ratios are computed from medians measured in one run.
"""

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cli.fleet import ROOT, Fleet, client_for, test_lm_server, worker_env
from contracts.connections import redis_client
from contracts.names import ROUTING_QUEUE, bench_bare_task, stage_queue
from routing.client import Client
from workers.settings import LMSettings

CATALOG = [ROOT / "pipelines", ROOT / "bench" / "pipelines"]
PLUGINS = '["bench.bare:register"]'  # the routing tasks come from workers.app, the composition root
# A fleet with the shared stage cache on. Sampled calls are not cached (`workers.cache.cacheable`), so
# its workers are pinned at temperature 0: the default, set here so the scenario never depends on it.
SHARED_CACHE_ENV = {"STAGECOACH_CACHE_ENABLED": "true", "STAGECOACH_LM_TEMPERATURE": "0"}


@dataclass(frozen=True)
class Scale:
    """How much each scenario runs: interleaved rounds, jobs per series per round, burst size."""

    name: str
    rounds: int
    jobs: int
    burst: int
    warmup: int


FULL = Scale("full", rounds=5, jobs=20, burst=100, warmup=3)
SMOKE = Scale("smoke", rounds=1, jobs=2, burst=4, warmup=1)


@dataclass
class Series:
    """Samples of one measured quantity, kept per round so ratios can show their spread."""

    label: str
    unit: str
    rounds: list[list[float]] = field(default_factory=list)

    def add_round(self, samples: list[float]) -> None:
        self.rounds.append(samples)

    @property
    def samples(self) -> list[float]:
        return [value for round_ in self.rounds for value in round_]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def round_medians(self) -> list[float]:
        return [statistics.median(r) for r in self.rounds if r]

    def summary(self) -> dict[str, Any]:
        values = sorted(self.samples)
        return {"unit": self.unit, "n": len(values), "median": self.median, "p25": _quantile(values, 0.25),
                "p75": _quantile(values, 0.75), "min": values[0], "max": values[-1],
                "round_medians": self.round_medians()}


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


@dataclass
class Ratio:
    """`num` median over `den` median (or `num` alone when `den` is None: an absolute bound).

    Per-round values give its spread. `target` bounds the value from the `better` side.
    """

    name: str
    num: Series
    den: Series | None
    target: float | None = None
    better: Literal["lower", "higher"] = "lower"

    def summary(self) -> dict[str, Any]:
        if self.den is None:
            value, per_round = self.num.median, self.num.round_medians()
        else:
            value = self.num.median / self.den.median
            per_round = [n / d for n, d in zip(self.num.round_medians(), self.den.round_medians(), strict=False)]
        return {"name": self.name, "value": value, "round_min": min(per_round), "round_max": max(per_round),
                "target": self.target, "better": self.better, "met": self.met(value)}

    def met(self, value: float) -> bool | None:
        if self.target is None:
            return None
        return value <= self.target if self.better == "lower" else value >= self.target


@dataclass
class Table:
    """Figures that are not samples (counts, accuracies): shown as they are, under the series."""

    title: str
    columns: list[str]
    rows: list[list[str]]

    def summary(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows}


@dataclass
class ScenarioResult:
    name: str
    title: str
    params: dict[str, Any]
    series: list[Series]
    ratios: list[Ratio]
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"title": self.title, "params": self.params, "notes": self.notes,
                "series": {s.label: s.summary() for s in self.series},
                "ratios": [r.summary() for r in self.ratios],
                "tables": [t.summary() for t in self.tables]}


@dataclass(frozen=True)
class WorkerPlan:
    name: str
    queues: list[str]
    pool: str = "threads"
    concurrency: int = 4


def stage_workers(stages: list[str], threads: int, prefix: str = "") -> list[WorkerPlan]:
    """One worker per stage queue (Stagecoach's layout)."""
    return [WorkerPlan(f"{prefix}stage-{s}", [stage_queue(s)], concurrency=threads) for s in stages]


def bare_workers(stages: list[str], threads: int) -> list[WorkerPlan]:
    """One worker per bare task queue (the hand-written chain's layout)."""
    return [WorkerPlan(f"bare-{s}", [bench_bare_task(s)], concurrency=threads) for s in stages]


def routing_worker(threads: int = 8) -> WorkerPlan:
    return WorkerPlan("routing", [ROUTING_QUEUE], concurrency=threads)


@dataclass
class Stack:
    """A running test LM and fleet: the client, the LM settings the workers use, the fleet."""

    client: Client
    lm: LMSettings
    fleet: Fleet
    redis_url: str

    def pid(self, worker: str) -> int:
        return next(w.proc.pid for w in self.fleet.workers if w.name == worker)


class Bench:
    """The harness's private Redis; each scenario gets its own test LM and fleet on it."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.logdir = Path(tempfile.mkdtemp(prefix="stagecoach-bench-"))

    @contextmanager
    def stack(self, latency_ms: float, workers: list[WorkerPlan], shared_cache: bool = False,
              lm_args: tuple[str, ...] = (), **more_env: str) -> Iterator[Stack]:
        """The test LM at `latency_ms` (and `lm_args`) and these workers; the shared stage cache only if
        `shared_cache`; `more_env`: more settings for the workers (STAGECOACH_...)."""
        redis_client(self.redis_url).flushdb()  # our own server: no one else's data
        with test_lm_server("--latency-ms", str(latency_ms), *lm_args) as lm_url:
            cache_env = SHARED_CACHE_ENV if shared_cache else {}
            env = worker_env(self.redis_url, lm_url, CATALOG, STAGECOACH_PLUGINS=PLUGINS, **cache_env, **more_env)
            fleet = Fleet(env, self.logdir)
            for plan in workers:
                fleet.start(plan.name, plan.queues, pool=plan.pool, concurrency=plan.concurrency)
            try:
                fleet.wait_ready()
                client = client_for(self.redis_url, lm_url, CATALOG, shared_cache=shared_cache)
                lm = LMSettings(model="openai/test-lm", api_base=lm_url, cache=False)
                yield Stack(client, lm, fleet, self.redis_url)
            finally:
                fleet.stop()


def timed(action: Callable[[], Any]) -> float:
    """Seconds one call takes."""
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def timed_job(stack: Stack, pipeline: str, inputs: dict[str, Any]) -> float:
    """Seconds one job takes from the client, submit to result; a failed job stops the benchmark."""
    def job() -> None:
        result = stack.client.submit(pipeline, inputs).get(timeout=60)
        if not result.ok:
            raise RuntimeError(f"{pipeline} failed: {result.error}")
    return timed(job)


def run_burst(stack: Stack, pipeline: str, inputs: list[dict[str, Any]], timeout: float = 600) -> None:
    """Submit every job at once, then wait for each; a failed job stops the benchmark."""
    handles = [stack.client.submit(pipeline, item) for item in inputs]
    for handle in handles:
        if not handle.get(timeout=timeout).ok:
            raise RuntimeError(f"{pipeline} job {handle.id} failed")


def interleave(rounds: int, series: dict[str, Callable[[int], list[float]]]) -> dict[str, list[list[float]]]:
    """Run every series once per round, in turn, so drift on a shared machine hits all alike."""
    out: dict[str, list[list[float]]] = {name: [] for name in series}
    for index in range(rounds):
        for name, measure in series.items():
            out[name].append(measure(index))
    return out
