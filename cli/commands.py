"""Bodies of `submit` and `result`: turn flags into requests, results into output and exit codes."""

from pathlib import Path
from typing import Any

from rich.markup import escape

from cli import render
from cli.exits import EXIT_FAILED, EXIT_INPUT, EXIT_OK, EXIT_PENDING
from cli.inputs import parse_pairs
from cli.jobs import Submitted, wait_all
from cli.jobs import submit_file as submit_lines
from contracts.jobs import JobResult
from contracts.specs import PipelineSpec
from routing.client import Client, JobHandle
from routing.errors import JobTimeoutError


def gather_inputs(spec: PipelineSpec, pairs: list[str], example: bool) -> dict[str, Any]:
    """The example (when asked for), overridden by --input pairs."""
    if example and not spec.example:
        raise ValueError(f"pipeline '{spec.name}' defines no example input")
    base = dict(spec.example) if example else {}
    return {**base, **parse_pairs(pairs, spec.inputs)}


def after_submit(handle: JobHandle, wait: bool, as_json: bool, timeout: float) -> int:
    if not wait:
        if as_json:
            render.print_json({"job_id": handle.id})
        else:
            print(handle.id)
        return EXIT_OK
    try:
        return print_result(handle.get(timeout=timeout), as_json)
    except JobTimeoutError as error:
        render.err.print(f"[red]error:[/] {error}; see `stagecoach status {handle.id}`")
        return EXIT_PENDING


def print_result(result: JobResult, as_json: bool) -> int:
    if as_json:
        render.print_json(result.model_dump(mode="json"))
    else:
        render.out.print(render.result_table(result))
        if result.timings:
            render.out.print(render.timings_table([result]))
        if result.usage or result.cached_usage:
            render.out.print(render.usage_table(result))
    if result.error is not None:
        render.err.print(f"[red]job {result.job_id} failed:[/] {escape(result.error.message)}", highlight=False)
    return EXIT_OK if result.ok else EXIT_FAILED


def submit_file(client: Client, pipeline: str, path: Path, wait: bool, as_json: bool, timeout: float) -> int:
    """Submit every line, report bad lines on stderr; exit 2 when any line was bad, else 1 if a job failed."""
    submitted = submit_lines(client, pipeline, path)
    for bad in (s for s in submitted if s.problem is not None):
        render.err.print(f"[red]error:[/] {escape(f'{path}: line {bad.line}: {bad.problem}')}", highlight=False,
                         soft_wrap=True)
    good = [s for s in submitted if s.handle is not None]
    results = wait_all([s.handle for s in good if s.handle], timeout) if wait else []
    _print_lines(submitted, good, results, as_json)
    if any(s.problem for s in submitted):
        return EXIT_INPUT
    return EXIT_FAILED if any(not (isinstance(r, JobResult) and r.ok) for r in results) else EXIT_OK


def _print_lines(submitted: list[Submitted], good: list[Submitted], results: list[JobResult | str],
                 as_json: bool) -> None:
    by_line = {s.line: r for s, r in zip(good, results, strict=False)}
    rows = [_line_row(s, by_line.get(s.line)) for s in submitted]
    if as_json:
        render.print_json(rows)
        return
    for row in rows:
        render.out.print(f"line {row['line']}: {row.get('job_id') or '-'} {_outcome(row)}", highlight=False,
                         markup=False, soft_wrap=True)


def _outcome(row: dict[str, Any]) -> str:
    """`queued`, the job's final state (a failed job's error after it), or `error: WHY`."""
    if "error" in row:
        return f"error: {row['error']}"
    if "result" not in row:
        return "queued"
    result = row["result"]
    error = result.get("error") or {}
    return f"{result['state']}: {error['message']}" if error.get("message") else str(result["state"])


def _line_row(item: Submitted, result: JobResult | str | None) -> dict[str, Any]:
    row: dict[str, Any] = {"line": item.line, "job_id": item.handle.id if item.handle else None}
    if item.problem is not None:
        row["error"] = item.problem
    elif isinstance(result, JobResult):
        row["result"] = result.model_dump(mode="json")
    elif isinstance(result, str):
        row["error"] = result
    return row


def show_result(client: Client, job_id: str, wait: bool, as_json: bool, timeout: float) -> int:
    handle = client.handle(job_id)
    if handle.ready():
        return print_result(handle.get(timeout=timeout), as_json)
    status = client.status(job_id)
    if status.state == "unknown":
        render.err.print(f"[red]error:[/] no job {job_id} (never submitted, or its record expired)")
        return EXIT_PENDING
    if not wait:
        render.err.print(f"job {job_id} not finished: {status.state}"
                         f"{' in stage ' + status.stage if status.stage else ''}; use --wait to wait")
        return EXIT_PENDING
    try:
        return print_result(handle.get(timeout=timeout), as_json)
    except JobTimeoutError as error:
        render.err.print(f"[red]error:[/] {error}")
        return EXIT_PENDING
