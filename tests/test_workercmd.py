"""One builder of the Celery worker command line (issue 17): `stagecoach up`, the fleets and the renderers
share it; its argv and text forms are the same command."""

import shlex

import pytest

from cli.workercmd import Autoscale, WorkerCommand, routing_worker, stage_worker
from contracts.names import DEFAULT_QUEUE, ROUTING_QUEUE


def test_argv_and_text_are_one_command() -> None:
    command = stage_worker("answer@1", 2, pool="prefork", concurrency=3)
    assert shlex.split(command.text()) == command.argv()
    argv = command.argv()
    assert argv[:4] == ["celery", "-A", "workers.app", "worker"]
    assert argv[argv.index("-Q") + 1] == "stage.answer@1"
    assert argv[argv.index("-n") + 1] == "stage-answer-v1-2@%h"
    assert argv[argv.index("--pool") + 1] == "prefork" and argv[argv.index("--concurrency") + 1] == "3"


def test_routing_worker_serves_the_default_queue_too() -> None:
    argv = routing_worker().argv()
    assert argv[argv.index("-Q") + 1] == f"{ROUTING_QUEUE},{DEFAULT_QUEUE}"


def test_autoscale_replaces_the_fixed_pool_size() -> None:
    argv = WorkerCommand("w", ("q",), autoscale=Autoscale(1, 8), logfile="/tmp/w.log").argv()
    assert "--concurrency" not in argv
    assert argv[argv.index("--autoscale") + 1] == "8,1"  # Celery's order: MAX,MIN
    assert argv[argv.index("--logfile") + 1] == "/tmp/w.log"


@pytest.mark.parametrize(("low", "high"), [(3, 2), (-1, 2), (0, 0)])
def test_a_bad_autoscale_range_says_so(low: int, high: int) -> None:
    with pytest.raises(ValueError, match="expected 0 <= MIN <= MAX"):
        Autoscale(low, high)
