"""`stagecoach optimize`: DSPy's optimiser in this process, every evaluation a job on the fleet.

A progress line counts evaluations (jobs run, replayed from the journal, failed) and shows the latest
trial's score; the end prints every trial's score, the best, the devset score before and after, what
the fleet spent, and the new version registered beside the old.
"""

from dataclasses import dataclass
from pathlib import Path

from rich.console import Group
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli import render
from optimize.journal import Evaluation
from optimize.optimizers import Trial
from optimize.register import Registered
from optimize.run import Outcome


@dataclass
class Counts:
    jobs: int = 0
    replayed: int = 0
    trials: int = 0
    last: str = ""


class OptimizeProgress:
    """A live line over evaluations and trials (rich; written to stderr so --json stays clean)."""

    def __init__(self, pipeline: str, optimizer: str, enabled: bool = True) -> None:
        self.counts = Counts()
        self.title = f"{optimizer} on {pipeline}"
        columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        self.progress = Progress(*columns, console=render.err, disable=not enabled)
        self.task = self.progress.add_task(self._line(), total=None)

    def __enter__(self) -> "OptimizeProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def evaluation(self, evaluation: Evaluation, replayed: bool) -> None:
        if replayed:
            self.counts.replayed += 1
        else:
            self.counts.jobs += 1
        self.progress.update(self.task, description=self._line())

    def trial(self, trial: Trial) -> None:
        self.counts.trials += 1
        score = "?" if trial.score is None else f"{trial.score:g}"
        self.counts.last = f"trial {trial.number} ({trial.kind}, {trial.examples} ex.): {score}"
        self.progress.update(self.task, description=self._line())

    def _line(self) -> str:
        c = self.counts
        parts = [self.title, f"evaluations: {c.jobs} jobs", f"{c.replayed} from the journal"]
        if c.last:
            parts.append(c.last)
        return " · ".join(parts)


def outcome_view(outcome: Outcome, registered: Registered | None, metric: str) -> Group:
    return Group(_trials_table(outcome), _summary_table(outcome, registered, metric))


def _trials_table(outcome: Outcome) -> Table:
    table = Table(title="trials (each dspy.Evaluate call of the optimiser)", title_justify="left")
    for column in ("trial", "kind", "examples", "score"):
        table.add_column(column, justify="right" if column != "kind" else "left")
    trials = [t for t in outcome.trials if t.kind != "devset"]
    scored = [t for t in trials if t.score is not None]
    best = max(scored, key=lambda t: t.score or 0.0) if scored else None
    for trial in trials:
        mark = " best" if trial is best else ""
        table.add_row(str(trial.number), trial.kind + mark, str(trial.examples),
                      "?" if trial.score is None else f"{trial.score:g}")
    if not trials:
        table.add_row("-", "no Evaluate calls (BootstrapFewShot keeps demos whose trace passed the metric)", "", "")
    return table


def _summary_table(outcome: Outcome, registered: Registered | None, metric: str) -> Table:
    table = Table(title="optimisation", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    rows = [("wall time", f"{outcome.seconds:.1f} s"),
            ("evaluations", f"{outcome.jobs} jobs on the fleet, {outcome.replayed} replayed from the journal, "
                            f"{outcome.failed} failed"),
            ("fleet LM calls", f"{outcome.usage.calls} ({outcome.usage.prompt_tokens} prompt + "
                               f"{outcome.usage.completion_tokens} completion tokens)")]
    if outcome.baseline is not None:
        rows.append((f"devset {metric} before -> after", f"{outcome.baseline:g} -> {outcome.optimised:g}"))
    for name, module in outcome.program.stage_modules():
        for pred_name, predictor in module.named_predictors():
            instructions = predictor.signature.instructions.strip().splitlines()[0][:90]
            rows.append((f"{name}.{pred_name}", f"{len(predictor.demos)} demos; {instructions}"))
    if registered is not None:
        rows.append(("registered", f"{registered.pipeline}@{registered.version} beside @{registered.base_version}: "
                                   f"{registered.file}"))
        rows.append(("next", f"restart the workers (`stagecoach up`) to serve it; compare with `stagecoach eval "
                             f"{registered.pipeline} --versions {registered.base_version},{registered.version} "
                             f"--devset FILE`"))
    for what, value in rows:
        table.add_row(what, value)
    return table


def catalog_folder(paths: list[Path]) -> Path:
    """Where a new version's file goes by default: the first catalog folder (a file's folder)."""
    first = paths[0]
    return first if first.is_dir() else first.parent
