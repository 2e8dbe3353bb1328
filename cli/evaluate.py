"""`stagecoach eval`: run QA questions through a distributed pipeline and score the answers.

Questions are submitted as ordinary jobs (so workers must be running: `stagecoach up`), at most
`concurrency` in flight so latencies measure the pipeline rather than a backlog. Scores follow the
HotPotQA evaluation script: exact match and token F1 on the normalised answer, and recall of the
gold supporting titles among the passages the retrieve stages read. A failed or timed-out job
scores 0 on every metric and is counted. Latency per job is the server-side time from
`pipeline.run` to `pipeline.finish`; per stage it is the stage call (monitor.stats aggregates).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli import render
from contracts.envelope import Usage
from contracts.jobs import JobResult
from monitor.evaluation import QAExample, exact_match, title_recall, token_f1
from monitor.stats import Summary, stage_stats, summarize
from routing.client import Client, JobHandle

POLL_SECONDS = 0.05


@dataclass(frozen=True)
class EvalFields:
    """Which pipeline fields hold the question (input), the answer and the retrieved titles."""

    question: str = "question"
    answer: str = "final_answer"
    titles: str = "retrieved_titles"


class ItemScore(BaseModel):
    id: str
    question: str
    gold: str
    prediction: str | None = None
    exact_match: float = 0.0
    f1: float = 0.0
    title_recall: float = 0.0
    seconds: float | None = None
    job_id: str | None = None
    error: str | None = None


class EvalReport(BaseModel):
    pipeline: str
    questions: int
    succeeded: int
    failed: int
    exact_match: float
    f1: float
    title_recall: float
    wall_seconds: float
    job_latency: Summary | None
    stage_latency: dict[str, Summary]
    usage: dict[str, Usage]
    total_usage: Usage
    items: list[ItemScore]


Outcome = JobResult | str  # a result, or why there is none


def run_jobs(client: Client, pipeline: str | list[str], inputs: list[dict[str, Any]], concurrency: int,
             timeout: float, on_done: Callable[[int, Outcome], None]) -> list[Outcome]:
    """Submit every input with at most `concurrency` jobs in flight; outcomes in input order. `pipeline` may
    be one per input (`qa@1`, `qa@2`: versions compared in one run)."""
    if concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1 (got {concurrency})")
    outcomes: dict[int, Outcome] = {}
    flying: dict[int, tuple[JobHandle, float]] = {}
    queued = list(enumerate(inputs))
    while queued or flying:
        while queued and len(flying) < concurrency:
            index, job_inputs = queued.pop(0)
            target = pipeline if isinstance(pipeline, str) else pipeline[index]
            flying[index] = (client.submit(target, job_inputs), time.time())
        finished = {i: _poll(handle, started, timeout) for i, (handle, started) in flying.items()}
        for index, outcome in finished.items():
            if outcome is not None:
                del flying[index]
                outcomes[index] = outcome
                on_done(index, outcome)
        if all(outcome is None for outcome in finished.values()):
            time.sleep(POLL_SECONDS)
    return [outcomes[i] for i in range(len(inputs))]


def _poll(handle: JobHandle, started: float, timeout: float) -> Outcome | None:
    if handle.ready():
        return handle.get(timeout=timeout)
    if time.time() - started > timeout:
        return f"job {handle.id} not finished after {timeout:.0f}s"
    return None


def score(example: QAExample, outcome: Outcome, fields: EvalFields) -> ItemScore:
    base = ItemScore(id=example.id, question=example.question, gold=example.answer)
    if isinstance(outcome, str):
        return base.model_copy(update={"error": outcome})
    if not outcome.ok:
        message = outcome.error.message if outcome.error else outcome.state
        return base.model_copy(update={"job_id": outcome.job_id, "error": message, "seconds": outcome.seconds})
    prediction = str(outcome.fields.get(fields.answer) or "")
    titles = outcome.fields.get(fields.titles) or []
    return base.model_copy(update={
        "prediction": prediction,
        "exact_match": exact_match(prediction, example.answer),
        "f1": token_f1(prediction, example.answer),
        "title_recall": title_recall(titles, example.supporting_titles),
        "seconds": outcome.seconds,
        "job_id": outcome.job_id,
    })


def build_report(pipeline: str, items: list[ItemScore], results: list[JobResult], wall: float) -> EvalReport:
    count = len(items) or 1
    usage: dict[str, Usage] = {}
    for result in results:
        for stage, used in result.usage.items():
            usage[stage] = usage.get(stage, Usage()).plus(used)
    total = Usage()
    for used in usage.values():
        total = total.plus(used)
    seconds = [r.seconds for r in results if r.seconds is not None]
    succeeded = sum(item.error is None for item in items)
    return EvalReport(
        pipeline=pipeline,
        questions=len(items),
        succeeded=succeeded,
        failed=len(items) - succeeded,
        exact_match=sum(i.exact_match for i in items) / count,
        f1=sum(i.f1 for i in items) / count,
        title_recall=sum(i.title_recall for i in items) / count,
        wall_seconds=wall,
        job_latency=summarize(seconds) if seconds else None,
        stage_latency=stage_stats(t for r in results for t in r.timings),
        usage=usage,
        total_usage=total,
        items=items,
    )


def evaluate(client: Client, pipeline: str, examples: list[QAExample], concurrency: int = 8,
             timeout: float = 600.0, fields: EvalFields | None = None, show_progress: bool = True) -> EvalReport:
    """Run every example through the pipeline and score it."""
    fields = fields or EvalFields()
    inputs = [{fields.question: e.question} for e in examples]
    scores: dict[int, ItemScore] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    started = time.time()
    with Progress(*columns, console=render.err, disable=not show_progress) as progress:
        task = progress.add_task(f"{pipeline}: running", total=len(examples))

        def done(index: int, outcome: Outcome) -> None:
            scores[index] = score(examples[index], outcome, fields)
            progress.update(task, advance=1, description=_running_line(pipeline, list(scores.values())))

        outcomes = run_jobs(client, pipeline, inputs, concurrency, timeout, done)
    results = [o for o in outcomes if isinstance(o, JobResult)]
    return build_report(pipeline, [scores[i] for i in range(len(examples))], results, time.time() - started)


def _running_line(pipeline: str, items: list[ItemScore]) -> str:
    n = len(items)
    em, f1 = sum(i.exact_match for i in items) / n, sum(i.f1 for i in items) / n
    failed = sum(i.error is not None for i in items)
    return f"{pipeline}: EM {em:.3f} F1 {f1:.3f} failed {failed}"


def report_view(report: EvalReport) -> Group:
    return Group(_scores_table(report), _latency_table(report), _usage_table(report))


def _scores_table(report: EvalReport) -> Table:
    table = Table(title=f"eval {report.pipeline}: {report.questions} questions in {report.wall_seconds:.1f}s",
                  show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    rows = [("exact match", f"{report.exact_match:.3f}"), ("token F1", f"{report.f1:.3f}"),
            ("supporting-title recall", f"{report.title_recall:.3f}"),
            ("succeeded / failed", f"{report.succeeded} / {report.failed}")]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _latency_table(report: EvalReport) -> Table:
    table = Table(title="latency (seconds)", title_justify="left")
    for column in ("", "count", "mean", "p50", "p95", "min", "max"):
        table.add_column(column, justify="left" if not column else "right")
    rows = [(f"stage {name}", s) for name, s in report.stage_latency.items()]
    rows += [("job", report.job_latency)] if report.job_latency else []
    for name, s in rows:
        table.add_row(name, str(s.count), *(f"{v:.3f}" for v in (s.mean, s.p50, s.p95, s.min, s.max)))
    return table


def _usage_table(report: EvalReport) -> Table:
    table = Table(title="token usage", title_justify="left")
    for column in ("stage", "prompt", "completion", "calls"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for name, used in [*report.usage.items(), ("total", report.total_usage)]:
        table.add_row(name, str(used.prompt_tokens), str(used.completion_tokens), str(used.calls))
    return table


def data_path(path: Path) -> Path:
    if not path.is_file():
        raise ValueError(f"--data {path}: no such file")
    return path


def answer_field_of(client: Client, pipeline: str) -> EvalFields:
    """The fields a pipeline answers in: `final_answer` (multi-hop), else `answer`, else its last output."""
    outputs = client.runtime.catalog.pipeline(pipeline).outputs
    answer = next((name for name in ("final_answer", "answer") if name in outputs), outputs[-1] if outputs else "")
    return EvalFields(answer=answer)


def evaluate_versions(client: Client, pipeline: str, versions: list[str], examples: list[QAExample],
                      concurrency: int = 8, timeout: float = 600.0,
                      show_progress: bool = True) -> dict[str, EvalReport]:
    """Every example through every version in one run, interleaved (so a busy machine slows each alike);
    one report per version: scores, latency, tokens and cost."""
    refs = [f"{pipeline}@{version}" for version in versions]
    for ref in refs:
        client.runtime.catalog.pipeline(ref)  # an unknown version fails before any job runs
    fields = [answer_field_of(client, ref) for ref in refs]
    order = [(v, e) for e in range(len(examples)) for v in range(len(refs))]
    inputs = [{fields[v].question: examples[e].question} for v, e in order]
    scores: dict[int, ItemScore] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    started = time.time()
    with Progress(*columns, console=render.err, disable=not show_progress) as progress:
        task = progress.add_task(f"{pipeline}: versions {', '.join(versions)}", total=len(order))

        def done(index: int, outcome: Outcome) -> None:
            v, e = order[index]
            scores[index] = score(examples[e], outcome, fields[v])
            progress.update(task, advance=1)

        outcomes = run_jobs(client, [refs[v] for v, _ in order], inputs, concurrency, timeout, done)
    wall = time.time() - started
    reports = {}
    for v, version in enumerate(versions):
        picked = [i for i, (w, _) in enumerate(order) if w == v]
        results = [o for i in picked if isinstance(o := outcomes[i], JobResult)]
        reports[version] = build_report(refs[v], [scores[i] for i in picked], results, wall)
    return reports


def versions_view(reports: dict[str, EvalReport]) -> Group:
    """One row per version: the scores, job latency, tokens and cost; then each version's stage latencies."""
    table = Table(title=f"versions compared on {next(iter(reports.values())).questions} questions",
                  title_justify="left")
    for column in ("version", "EM", "F1", "title recall", "ok/failed", "job p50 s", "job p95 s", "LM calls",
                   "tokens", "cost USD"):
        table.add_column(column, justify="left" if column == "version" else "right")
    for report in reports.values():
        latency = report.job_latency
        used = report.total_usage
        cost = "n/a" if used.cost_usd is None else f"{used.cost_usd:.4f}"
        table.add_row(report.pipeline, f"{report.exact_match:.3f}", f"{report.f1:.3f}", f"{report.title_recall:.3f}",
                      f"{report.succeeded}/{report.failed}", f"{latency.p50:.2f}" if latency else "-",
                      f"{latency.p95:.2f}" if latency else "-", str(used.calls),
                      str(used.prompt_tokens + used.completion_tokens), cost)
    return Group(table, *(_latency_table(r) for r in reports.values()))
