"""Every example pipeline in the catalog is an end-to-end test, and so is `stagecoach demo`.

Each pipeline that ships an `example` input runs on the session's real workers with the test LM
and must succeed with every declared output present; `stagecoach demo` starts a stack of its own
(its own Redis on a free port) and must run every example to completion.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from contracts.catalog import load_catalog
from routing.client import Client
from tests.services import ROOT, free_port, worker_env

SHIPPED = load_catalog([ROOT / "pipelines"])
EXAMPLES = sorted(name for name, spec in SHIPPED.pipelines.items() if spec.example)
STAGECOACH = str(Path(sys.executable).with_name("stagecoach"))


def test_the_catalog_ships_examples() -> None:
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("pipeline", EXAMPLES)
def test_example_pipeline_runs_end_to_end(client: Client, pipeline: str) -> None:
    spec = SHIPPED.pipeline(pipeline)
    result = client.submit(pipeline, spec.example).get(timeout=120)
    assert result.state == "succeeded", result.error
    assert set(result.answer) == set(spec.outputs)
    missing = [name for name in spec.outputs if result.answer[name] in (None, "", [])]
    assert not missing, f"{pipeline}: empty outputs {missing}"
    assert result.timings and all(t.seconds >= 0 for t in result.timings)


def test_stagecoach_demo_runs_every_example(lm_url: str, tmp_path: Path) -> None:
    broker = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there: the demo starts its own Redis
    env = worker_env(broker, lm_url, catalog=[ROOT / "pipelines"], STAGECOACH_FLOWER_PORT=str(free_port()))
    done = subprocess.run([STAGECOACH, "demo", "--timeout", "120"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{len(EXAMPLES)} succeeded, 0 failed, 0 not finished" in done.stdout
    assert "Flower (live tasks and workers)" in done.stdout
