"""`stagecoach monitor` (the service), `monitor report [--json]` and `monitor reset`."""

import logging
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from cli import render

if TYPE_CHECKING:
    from monitor.report import ErrorGroup, Figures
    from monitor.settings import MonitorSettings
    from monitor.stats import Summary

monitor_app = typer.Typer(help="The monitor: the fleet's event stream per stage and pipeline, per-job traces, "
                               "JSON, Prometheus /metrics and a web page.", no_args_is_help=False)
JsonFlag = Annotated[bool, typer.Option("--json", help="print the report as JSON (what /api/stats serves)")]


def settings(port: int | None = None, host: str | None = None) -> "MonitorSettings":
    """Monitor settings; the broker is the one `stagecoach up` recorded when none is configured."""
    from cli.jobs import client_settings
    from monitor.settings import MonitorSettings

    found = MonitorSettings()
    update: dict[str, object] = {k: v for k, v in (("port", port), ("host", host)) if v is not None}
    # the workers' settings: the URL `up` recorded, passwords applied (STAGECOACH_REDIS_PASSWORD ...);
    # the store is Redis, so with a RabbitMQ broker it defaults to the result backend
    stack = client_settings()
    update["broker_url"] = stack.broker_url
    update["sentinel"] = stack.sentinel
    if found.store_url is None:
        update["store_url"] = stack.backend_url
    return found.model_copy(update=update)


@monitor_app.callback(invoke_without_command=True)
def monitor(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option(help="HTTP port (default STAGECOACH_MONITOR_PORT, 8095)")] = None,
    host: Annotated[str | None, typer.Option(help="HTTP interface (default 127.0.0.1)")] = None,
) -> None:
    """Run the monitor service in the foreground until Ctrl-C."""
    if ctx.invoked_subcommand is not None:
        return
    from cli.exits import EXIT_INPUT
    from cli.up import stop_signals
    from monitor.server import UnsafeBind, check_bind, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    chosen = settings(port, host)
    try:
        check_bind(chosen)
    except UnsafeBind as error:
        render.err.print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_INPUT) from None
    render.err.print(f"monitor: http://{chosen.host}:{chosen.port}  (events from {chosen.store})")
    with stop_signals() as stop:
        serve(chosen, stop)


@monitor_app.command()
def report(as_json: JsonFlag = False) -> None:
    """Per-stage and per-pipeline figures and the error summary, from the monitor's store."""
    from monitor.store import Store

    figures = Store.connect(settings()).report()
    if as_json:
        render.print_json(figures.model_dump(mode="json"))
        return
    render.out.print(figures_table("stages", figures.stages))
    render.out.print(figures_table("pipelines (jobs)", figures.pipelines))
    if figures.pipeline_versions:
        render.out.print(figures_table("pipeline versions (jobs)", figures.pipeline_versions))
    render.out.print(errors_table(figures.errors))


@monitor_app.command()
def reset() -> None:
    """Delete the monitor's store (its counters, samples, series, error examples and traces)."""
    from monitor.store import Store

    Store.connect(settings()).clear()
    render.out.print("monitor store cleared")


def _secs(summary: "Summary | None", field: str) -> str:
    return "-" if summary is None else f"{getattr(summary, field):.3f}"


def figures_table(title: str, rows: "list[Figures]") -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("name", "runs", "ok", "failed (kind)", "retries", "skipped", "cache", "mean s", "p50", "p95", "p99",
                   "min", "max", "wait p50", "tokens in/out", "bytes in/out", "/min"):
        table.add_column(column, justify="left" if column in ("name", "failed (kind)") else "right")
    for f in rows:
        rt, wait = f.runtime, f.queue_wait
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(f.failures.items()))
        table.add_row(f.name, str(f.runs), str(f.succeeded), f"{f.failed}" + (f" ({kinds})" if kinds else ""),
                      str(f.retries), str(f.skipped), str(f.cache_hits),
                      *(_secs(rt, q) for q in ("mean", "p50", "p95", "p99", "min", "max")),
                      _secs(wait, "p50"), f"{f.prompt_tokens}/{f.completion_tokens}",
                      f"{f.input_bytes}/{f.output_bytes}", f"{f.throughput_per_min:.0f}")
    return table


def errors_table(groups: "list[ErrorGroup]") -> Table:
    table = Table(title="errors by stage and kind (latest example)", title_justify="left")
    for column in ("stage", "kind", "count", "latest job", "node", "message"):
        table.add_column(column)
    for g in groups:
        latest = g.latest[0] if g.latest else None
        table.add_row(g.stage, g.kind, str(g.count), latest.job_id if latest else "",
                      latest.node if latest else "", (latest.message[:100] if latest else ""))
    return table
