"""`stagecoach cache stats` and `stagecoach cache clear`: the fleet-wide stage cache in Redis.

Both talk to Redis directly (no Celery app, no catalog): the cache is keyed by stage name and
version, and `clear` deletes only keys under the cache prefix (contracts/names.py).
"""

from typing import Annotated

import typer
from rich.table import Table

from cli import render
from cli.exits import EXIT_SERVICES
from cli.stack import redis_reachable
from workers.cache import CacheReport, StageCache

cache_app = typer.Typer(help="The stage cache shared by every worker (Redis).", no_args_is_help=True)


def _cache() -> StageCache:
    from cli.jobs import client_settings  # imports Celery and DSPy: only when a command runs

    settings = client_settings()
    if not redis_reachable(settings.backend_url):
        render.err.print(f"[red]error:[/] cannot reach Redis at {settings.backend_url}: start the stack with "
                         "`stagecoach up` or set STAGECOACH_BROKER_URL", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_SERVICES)
    return StageCache.from_url(settings.backend_url, settings.cache, settings.sentinel)


@cache_app.command()
def stats(as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False) -> None:
    """Per stage version: hits, misses, hit rate, entries, bytes, evictions."""
    report = _cache().report()
    if as_json:
        render.print_json({**report.model_dump(mode="json"),
                           "stages": [{**s.model_dump(mode="json"), "hit_rate": s.hit_rate} for s in report.stages]})
        return
    render.out.print(stats_table(report))


@cache_app.command()
def clear(stage: Annotated[str | None, typer.Argument(help="a stage (every version) or stage@version")] = None) -> None:
    """Delete the cached entries and counters of STAGE, or of every stage."""
    removed = _cache().clear(stage)
    render.out.print(f"removed {removed} cache entries{' of ' + stage if stage else ''}", highlight=False)


def stats_table(report: CacheReport) -> Table:
    used = f"{report.total_bytes:,} of {report.max_bytes:,} bytes"
    table = Table(title=f"stage cache ({used})", title_justify="left")
    for column in ("stage", "hits", "misses", "hit rate", "entries", "bytes", "evictions", "expired"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for s in report.stages:
        rate = f"{s.hit_rate:.0%}" if s.hit_rate is not None else "-"
        table.add_row(s.stage, str(s.hits), str(s.misses), rate, str(s.entries), f"{s.bytes:,}",
                      str(s.evictions), str(s.expired))
    if not report.stages:
        table.add_row("(empty)", *["-"] * 7)
    return table
