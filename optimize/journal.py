"""The journal of finished evaluations: what `--resume` replays instead of running a job again.

One JSON line per evaluation that finished well, keyed by what determines it: the pipeline ref, the
example's inputs and each stage's candidate (state digest and LM settings). An optimiser started
again with the same seed asks for the same evaluations in the same order, so every one the journal
holds comes back at once and the run continues from the first it does not. Failed evaluations are not
kept: a resumed run tries them again.
"""

import json
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from contracts.candidates import StageCandidate, TraceStep, canonical, state_digest
from contracts.envelope import Usage


class Evaluation(BaseModel):
    """What a finished evaluation job left that the proxy needs: the answer, the traces, the usage."""

    key: str
    job_id: str
    answer: dict[str, Any]
    traces: list[TraceStep]
    usage: Usage = Usage()
    seconds: float | None = None


def evaluation_key(pipeline: str, inputs: dict[str, Any], candidates: dict[str, StageCandidate]) -> str:
    material = {"pipeline": pipeline, "inputs": inputs,
                "candidates": {name: c.model_dump(mode="json") for name, c in sorted(candidates.items())}}
    return state_digest(material)


class Journal:
    """Finished evaluations in a JSON-lines file (appended as they finish), read back on `--resume`."""

    def __init__(self, path: Path | None, resume: bool) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._done: dict[str, Evaluation] = {}
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume and path.exists():
            self._done = {e.key: e for e in _read(path)}
        else:
            path.write_text("")

    def __len__(self) -> int:
        return len(self._done)

    def get(self, key: str) -> Evaluation | None:
        with self._lock:
            return self._done.get(key)

    def add(self, evaluation: Evaluation) -> None:
        with self._lock:
            self._done[evaluation.key] = evaluation
            if self.path is not None:
                with self.path.open("a", encoding="utf-8") as out:
                    out.write(canonical(evaluation.model_dump(mode="json")) + "\n")


def _read(path: Path) -> list[Evaluation]:
    """Every complete line (a run stopped mid-write leaves at most one broken last line, skipped)."""
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            found.append(Evaluation.model_validate(json.loads(line)))
        except ValueError:
            continue
    return found
