"""`stagecoach demo`: start the stack, run every pipeline's example, show answers and per-stage timings."""

from pathlib import Path

from cli import render
from cli.jobs import wait_all
from cli.up import running_stack, serve_until_stopped, show, stop_signals
from contracts.jobs import JobResult
from routing.client import Client, JobHandle
from workers.factory import catalog_of, create_app
from workers.settings import Settings


def submit_examples(client: Client, limit: int) -> list[JobHandle]:
    """Each pipeline's example input, at most `limit` pipelines, in name order."""
    catalog = catalog_of(client.app)
    names = [name for name in sorted(catalog.pipelines) if catalog.pipelines[name].example][:limit]
    handles = []
    for name in names:
        handles.append(client.submit(name, catalog.pipelines[name].example))
        render.out.print(f"submitted {name}: job {handles[-1].id}")
    return handles


def report(results: list[JobResult | str]) -> bool:
    finished = [r for r in results if isinstance(r, JobResult)]
    for result in results:
        if isinstance(result, JobResult):
            render.out.print(render.result_table(result))
        else:
            render.out.print(f"[red]{result}[/]")
    render.out.print(render.timings_table(finished))
    return len(finished) == len(results) and all(r.ok for r in finished)


def demo(settings: Settings, state_dir: Path, keep: bool, limit: int, timeout: float) -> int:
    with stop_signals() as stop, running_stack(settings, state_dir, stop) as stack:
        show(stack)
        client = Client(create_app(stack.settings))
        ok = report(wait_all(submit_examples(client, limit), timeout))
        render.out.print(f"Flower (live tasks and workers): {stack.flower_url}")
        if keep:
            render.out.print("stack kept running - Ctrl-C stops all of it")
            serve_until_stopped(stack, stop)
        return 0 if ok else 1
