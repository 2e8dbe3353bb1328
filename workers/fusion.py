"""LM-level fusion (the tutorial's FusedCoT): two adjacent stages, one signature, one LM call.

When both stages' specs say `fusible: lm`, both are `dspy.Signature`s, and the second reads the
first's outputs under their own names, the fused task runs them as one merged signature: the
first's inputs plus the second's other inputs in, both stages' output fields out, the two
instructions as two steps. Each stage's outputs are checked against its own contract and recorded
under its own node; the LM call, its usage and its cache entry belong to the first stage, and the
second stage's timing names it (`shared_call`). Pairs that do not qualify run one after another.
"""

from collections.abc import Callable
from typing import Any

import dspy

from contracts.envelope import Envelope, StageTiming, Usage
from contracts.specs import StageNode, StageSpec
from workers.cache import StageCache
from workers.settings import LMSettings
from workers.stage import StageRun, StageRunner, import_target

# (stage call, node path, run, stage spec[, shared call's node path]) -> the stage's timing record
TimingFn = Callable[..., StageTiming]


def mergeable(a: StageSpec, node_a: StageNode, b: StageSpec, node_b: StageNode) -> bool:
    """Both ask for it, share LM settings, and b reads a's outputs by their own names (no clash)."""
    if a.fusible != "lm" or b.fusible != "lm" or a.lm != b.lm or node_a.lm != node_b.lm:
        return False
    if set(a.outputs) & set(b.outputs) or set(a.inputs) & set(b.outputs):
        return False
    for name in set(a.inputs) & set(b.inputs):
        if node_a.inputs.get(name, name) != node_b.inputs.get(name, name):
            return False  # one input name, two sources
    written = {node_a.outputs.get(name, name): name for name in a.outputs}
    for name in b.inputs:
        source = node_b.inputs.get(name, name)
        if source in written and (written[source] != name or source != name):
            return False  # renamed on the way: the merged signature could not name it once
        if source not in written and name in a.outputs:
            return False
    return _is_signature(a) and _is_signature(b)


def _is_signature(spec: StageSpec) -> bool:
    try:
        target = import_target(spec)
    except Exception:  # an import error is reported when the stage runs alone
        return False
    return isinstance(target, type) and issubclass(target, dspy.Signature)


def merged_spec(a: StageSpec, node_a: StageNode, b: StageSpec, node_b: StageNode) -> StageSpec:
    """The pseudo-stage the merged call validates against (and is cached under)."""
    written = {node_a.outputs.get(name, name) for name in a.outputs}
    external = {name: field for name, field in b.inputs.items() if node_b.inputs.get(name, name) not in written}
    return a.model_copy(update={
        "name": f"{a.name}_{b.name}",
        "version": f"{a.version}-{b.version}",
        "program": "chain_of_thought" if "chain_of_thought" in (a.program, b.program) else "predict",
        "options": {"fused": [a.identity, b.identity]},
        "inputs": {**a.inputs, **external},
        "outputs": {**a.outputs, **b.outputs},
        "state": None,
        "state_digest": None,
    })


def merged_program(a: StageSpec, b: StageSpec, merged: StageSpec) -> dspy.Module:
    first, second = import_target(a), import_target(b)
    fields: dict[str, tuple[type, Any]] = {}
    for signature, names in ((first, a.inputs), (second, merged.inputs)):
        fields.update({n: (f.annotation, f) for n, f in signature.input_fields.items() if n in names})
    for signature in (first, second):
        fields.update({n: (f.annotation, f) for n, f in signature.output_fields.items()})
    instructions = f"Do two steps in one answer.\nStep 1: {first.instructions}\nStep 2: {second.instructions}"
    signature = dspy.make_signature(fields, instructions)
    return dspy.ChainOfThought(signature) if merged.program == "chain_of_thought" else dspy.Predict(signature)


class MergedRunner(StageRunner):
    """A stage runner whose program is the merged signature of two stages."""

    def __init__(self, a: StageSpec, b: StageSpec, merged: StageSpec, lm_settings: LMSettings,
                 cache: StageCache | None = None) -> None:
        super().__init__(merged, lm_settings, cache)
        self.first, self.second = a, b

    def program(self) -> dspy.Module:
        if not hasattr(self._local, "program"):
            self._local.program = merged_program(self.first, self.second, self.spec)
        return self._local.program  # type: ignore[no-any-return]


def merged_call(merged: StageSpec, node_a: StageNode, node_b: StageNode) -> StageNode:
    """The node the merged call runs as: a's input mapping plus b's for its own inputs."""
    inputs = {**{n: node_b.inputs.get(n, n) for n in merged.inputs if n not in node_a.inputs}, **node_a.inputs}
    return StageNode(stage=merged.name, inputs=inputs, critical=node_a.critical or node_b.critical, lm=node_a.lm)


def split(call: Any, job: Envelope, run: StageRun, pair: tuple[StageSpec, StageSpec],
          nodes: tuple[tuple[StageNode, str], tuple[StageNode, str]], timing: TimingFn) -> Envelope:
    """Record the merged call's outputs as two stages: each its own fields, the usage once (first)."""
    (a, b), ((node_a, path_a), (node_b, path_b)) = pair, nodes
    out_a = {name: run.outputs[name] for name in a.outputs if name in run.outputs}
    out_b = {name: run.outputs[name] for name in b.outputs if name in run.outputs}
    job = job.with_output(path_a, out_a, timing(call, path_a, run, a), run.usage, node_a.outputs, run.cached_usage)
    shared = timing(call, path_b, run, b, path_a)
    return job.with_output(path_b, out_b, shared, Usage(), node_b.outputs, Usage() if run.cached else None)
