"""Prometheus text for `/metrics`: the store's figures as metric families labelled by stage and pipeline."""

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from monitor.report import PAIR, Counts, Figures, Report
from monitor.stats import Summary

QUANTILES = (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))
# one counter family per counter of the report's model (its `failures` by kind has a family of its own)
COUNTED = tuple((name, field.description or name) for name, field in Counts.model_fields.items()
                if field.annotation is int)


class ReportCollector(Collector):
    """Reads a fresh report (and queue depths) at every scrape."""

    def __init__(self, report: Callable[[], Report], depths: Callable[[], dict[str, int]]) -> None:
        self.report = report
        self.depths = depths

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        report = self.report()
        for label, figures in (("stage", report.stages), ("pipeline", report.pipelines)):
            yield from _families(label, figures)
        yield _by_stage_and_pipeline(report.stage_pipelines)
        depth = GaugeMetricFamily("stagecoach_queue_depth", "messages waiting in a queue", labels=["queue"])
        for queue, waiting in sorted(self.depths().items()):
            depth.add_metric([queue], waiting)
        yield depth


def _families(label: str, figures: list[Figures]) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    for field, meaning in COUNTED:
        family = CounterMetricFamily(f"stagecoach_{label}_{field}", f"{meaning} per {label}", labels=[label])
        for fig in figures:
            family.add_metric([fig.name], getattr(fig, field))
        yield family
    failures = CounterMetricFamily(f"stagecoach_{label}_failures", f"failed runs per {label} and error kind",
                                   labels=[label, "kind"])
    for fig in figures:
        for kind, n in sorted(fig.failures.items()):
            failures.add_metric([fig.name, kind], n)
    yield failures
    yield _quantiles(f"stagecoach_{label}_runtime_seconds", "runtime of successful runs", label,
                     ((f.name, f.runtime) for f in figures))
    yield _quantiles(f"stagecoach_{label}_queue_wait_seconds", "seconds from sent to started", label,
                     ((f.name, f.queue_wait) for f in figures))


def _by_stage_and_pipeline(figures: list[Figures]) -> CounterMetricFamily:
    family = CounterMetricFamily("stagecoach_stage_pipeline_runs", "stage runs per stage, pipeline and outcome",
                                 labels=["stage", "pipeline", "outcome"])
    for fig in figures:
        stage, _, pipeline = fig.name.partition(PAIR)
        family.add_metric([stage, pipeline, "succeeded"], fig.succeeded)
        family.add_metric([stage, pipeline, "failed"], fig.failed)
    return family


def _quantiles(name: str, doc: str, label: str, rows: Iterable[tuple[str, Summary | None]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc + " (latest samples)", labels=[label, "quantile"])
    for who, summary in rows:
        if summary is not None:
            for quantile, field in QUANTILES:
                family.add_metric([who, quantile], getattr(summary, field))
    return family


def exposition(collector: ReportCollector) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
