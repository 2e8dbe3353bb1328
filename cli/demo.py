"""`stagecoach demo`: start the stack, run every pipeline's example, show answers and per-stage timings."""

from pathlib import Path

from cli import render
from cli.jobs import wait_all
from cli.up import running_stack, serve_until_stopped, show, stop_signals
from contracts.catalog import load_catalog
from contracts.jobs import JobResult
from routing.client import Client, JobHandle
from workers.factory import create_runtime
from workers.settings import Settings


def submit_examples(client: Client, names: list[str], limit: int) -> list[JobHandle]:
    """Each chosen pipeline's example input (default: every pipeline with one, in name order)."""
    catalog = client.runtime.catalog
    chosen = names or [name for name in sorted(catalog.pipelines) if catalog.pipelines[name].example]
    handles = []
    for name in chosen[:limit]:
        handles.append(client.submit(name, catalog.pipeline(name).example))
        render.out.print(f"submitted {name}: job {handles[-1].id}", highlight=False)
    return handles


def report(results: list[JobResult | str], asked: dict[str, dict[str, object]] | None = None) -> bool:
    """What each job was asked, its answers or error, and per-stage timings; True when every job finished
    (succeeded or failed)."""
    finished = [r for r in results if isinstance(r, JobResult)]
    for result in results:
        if not isinstance(result, JobResult):
            render.out.print(f"[red]{result}[/]")
            continue
        for name, value in (asked or {}).get(result.pipeline, {}).items():
            render.out.print(f"[bold]{name}[/]: {render.short(value, 400)}", highlight=False)
        render.out.print(render.result_table(result))
        render.out.print(_stage_times(result), highlight=False)
    render.out.print(render.timings_table(finished))
    failed = [r for r in finished if not r.ok]
    render.out.print(f"{len(finished) - len(failed)} succeeded, {len(failed)} failed, "
                     f"{len(results) - len(finished)} not finished", highlight=False)
    return len(finished) == len(results)


def _stage_times(result: JobResult) -> str:
    """`stage 1.23s, stage 0.45s` in the order the stages ran (the full table follows all jobs)."""
    return "stage times: " + (", ".join(f"{t.node} {t.seconds:.2f}s" for t in result.timings) or "-")


def demo(settings: Settings, state_dir: Path, names: list[str], keep: bool, limit: int, timeout: float) -> int:
    """Exit 0 when every example job finished; a failed job (say, a pipeline whose data is not on
    this machine) is shown with its error, a job that never finishes or a broken stack is not."""
    catalog = load_catalog(settings.catalog)
    for name in names:
        catalog.pipeline(name)  # an unknown name fails now, before anything starts
    with stop_signals() as stop, running_stack(settings, state_dir, stop) as stack:
        show(stack)
        client = Client(create_runtime(stack.settings))
        asked = {name: dict(spec.example or {}) for name, spec in catalog.pipelines.items()}
        ok = report(wait_all(submit_examples(client, names, limit), timeout), asked)
        render.out.print(f"Flower (live tasks and workers): {stack.flower_url}")
        if keep:
            render.out.print("stack kept running - Ctrl-C stops all of it")
            serve_until_stopped(stack, stop)
        return 0 if ok else 1
