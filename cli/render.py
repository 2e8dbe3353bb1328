"""Rich rendering of job results, job status, the catalog and the running stack."""

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from contracts.envelope import StageTiming, Usage
from contracts.jobs import JobResult, JobStatus
from contracts.specs import PipelineSpec

# Piped output (logs, CI) gets wide tables instead of rich's 80-column default.
out = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
TEXT_LIMIT = 160


def short(value: Any, limit: int = TEXT_LIMIT) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, no colour or wrapping."""
    print(json.dumps(data, indent=2, default=str))


def result_table(result: JobResult) -> Group:
    """A heading line (state, pipeline, seconds) above a table of answer fields and the error."""
    colour = "green" if result.ok else "red"
    seconds = f"{result.seconds:.2f}s" if result.seconds is not None else "-"
    heading = Text.from_markup(f"job {result.job_id} [{colour}]{result.state}[/] ({result.pipeline}, {seconds})")
    table = Table(show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for name, value in result.answer.items():
        table.add_row(name, short(value))
    if result.error is not None:
        where = f" at {result.error.node}" if result.error.node else ""
        table.add_row("error", f"[red]{result.error.kind}{where}: {short(result.error.message, 400)}[/]")
    if result.skipped:
        table.add_row("skipped", "not run, nothing needed their outputs: " + ", ".join(result.skipped))
    shared = [t.node for t in result.timings if t.cached and t.cache != "dspy"]
    replayed = [t.node for t in result.timings if t.cached and t.cache == "dspy"]
    if shared:
        table.add_row("cached", "served from the shared cache (no LM call): " + ", ".join(shared))
    if replayed:
        table.add_row("replayed", "answered by DSPy's own cache on the worker (no LM call, usage not known): "
                      + ", ".join(replayed))
    if result.usage or result.cached_usage:
        table.add_row("cost", cost_text(result.total_usage))
    return Group(heading, table)


def cost_text(usage: Usage) -> str:
    """A cost estimate, or why there is none."""
    if usage.calls == 0:
        return "no LM calls"
    if not usage.priced:
        return f"unknown (no local price for {', '.join(usage.unpriced)})"
    return f"${usage.cost_usd or 0.0:.6f} (estimate, litellm local price map)"


def usage_table(result: JobResult) -> Table:
    """Per stage: LM calls, tokens and cost spent by this job, and what cache hits once cost."""
    table = Table(title="usage per stage", title_justify="left")
    for column in ("stage", "calls", "prompt tok", "completion tok", "cost", "from cache"):
        table.add_column(column, justify="left" if column in ("stage", "cost", "from cache") else "right")
    for stage in sorted({*result.usage, *result.cached_usage}):
        used = result.usage.get(stage, Usage())
        cached = result.cached_usage.get(stage)
        saved = f"{cached.calls} calls, {cached.prompt_tokens + cached.completion_tokens} tok" if cached else "-"
        table.add_row(stage, str(used.calls), str(used.prompt_tokens), str(used.completion_tokens),
                      cost_text(used), saved)
    return table


def timings_table(results: list[JobResult]) -> Table:
    """Per-stage run time with the worker that ran it and its tries."""
    table = Table(title="per-stage timings", title_justify="left")
    for column in ("job", "node", "worker", "run s", "tries", "cached"):
        table.add_column(column, justify="right" if column.endswith((" s", "tries")) else "left", overflow="fold")
    for result in results:
        for timing in result.timings:
            table.add_row(f"{result.pipeline} {result.job_id[:6]}", timing.node, timing.worker.split("@")[0],
                          f"{timing.seconds:.2f}", str(timing.attempts), _cache_column(timing))
    return table


def _cache_column(timing: StageTiming) -> str:
    """`shared` (the fleet's stage cache), `dspy` (DSPy's own cache on the worker), or empty."""
    return (timing.cache or "yes") if timing.cached else ""


def status_table(status: JobStatus) -> Table:
    table = Table(title=f"job {status.job_id}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    for name, value in status.model_dump(exclude={"job_id"}).items():
        table.add_row(name, "-" if value is None else str(value))
    return table


def pipelines_table(specs: list[tuple[PipelineSpec, list[str], list[str]]]) -> Table:
    table = Table(title="pipelines", title_justify="left")
    for column in ("pipeline", "stages", "node kinds", "inputs", "outputs"):
        table.add_column(column)
    for spec, stages, kinds in specs:
        inputs = ", ".join(f"{name}: {field.type}" for name, field in spec.inputs.items())
        table.add_row(f"[bold]{spec.name}[/] v{spec.version}", ", ".join(stages),
                      ", ".join(kinds), inputs, ", ".join(spec.outputs))
    return table


def stack_table(rows: list[tuple[str, int, str, str, str]]) -> Table:
    table = Table(title="stagecoach stack", title_justify="left")
    for column in ("service", "pid", "queues / URL", "log"):
        table.add_column(column, overflow="fold")
    for name, pid, role, where, log in rows:
        table.add_row(f"{name} [dim]({role})[/]", str(pid), where, log)
    return table


def rows_table(title: str, columns: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table
