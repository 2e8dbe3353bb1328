"""`stagecoach` commands. Each command is a thin shell over a function in another cli module."""

import typer

app = typer.Typer(
    name="stagecoach",
    help="Run multi-stage DSPy programs as distributed Celery pipelines, one queue per stage.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Stagecoach: multi-stage DSPy pipelines on per-stage Celery queues."""


def main() -> None:
    app()
