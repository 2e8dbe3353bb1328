"""Timing aggregates (count, mean, p50, p95, p99, min, max): the one stats module.

`stagecoach eval` (from JobResult timings) and the monitor (from stage-outcome events, which carry
the same `seconds` the envelope records) both summarise with `summarize`, so their figures agree.
"""

import math
from collections import defaultdict
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict

from contracts.envelope import StageTiming


class Summary(BaseModel):
    """Aggregates of a list of durations in seconds."""

    model_config = ConfigDict(frozen=True)

    count: int
    mean: float
    p50: float
    p95: float
    p99: float
    min: float
    max: float


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an ascending list; q in [0, 100]."""
    if not sorted_values:
        raise ValueError("percentile of an empty list")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within [0, 100] (got {q})")
    rank = (len(sorted_values) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def summarize(values: Iterable[float]) -> Summary:
    ordered = sorted(values)
    if not ordered:
        raise ValueError("cannot summarize an empty list of durations")
    return Summary(
        count=len(ordered),
        mean=sum(ordered) / len(ordered),
        p50=percentile(ordered, 50),
        p95=percentile(ordered, 95),
        p99=percentile(ordered, 99),
        min=ordered[0],
        max=ordered[-1],
    )


def stage_stats(timings: Iterable[StageTiming]) -> dict[str, Summary]:
    """Aggregates per stage name, stages in order of first appearance."""
    by_stage: dict[str, list[float]] = defaultdict(list)
    for timing in timings:
        by_stage[timing.stage].append(timing.seconds)
    return {stage: summarize(seconds) for stage, seconds in by_stage.items()}
