"""Lazy evaluation, decided when a job starts: which stages to skip, which answers can come early.

Only the steps of the root sequence are candidates. Walking it backwards from the fields the job
must deliver (the pipeline's declared outputs, or the subset the caller asked for), a stage step
none of whose output fields is needed later is skipped; every other step adds what it reads to
the needed set. A node that is not a plain stage is never skipped and counts as reading every
name it mentions (an over-approximation: it can only keep stages, never drop a needed one).

A requested field written by exactly one stage of the whole tree, that stage a root step, and
named by no runtime node, is final once written: the stage publishes it for `JobHandle.output`.
"""

from dataclasses import dataclass
from typing import Any

from contracts.catalog import Catalog, iter_nodes
from contracts.envelope import Decision
from contracts.specs import AnyNode, PipelineSpec, SequenceNode, StageNode


@dataclass(frozen=True)
class Plan:
    spec: PipelineSpec  # the root without the skipped steps
    skipped: list[Decision]
    publish: list[str]  # fields that are final when first written


def plan(catalog: Catalog, spec: PipelineSpec, wanted: list[str]) -> Plan:
    root = spec.root
    if not spec.lazy or not wanted or not isinstance(root, SequenceNode):
        return Plan(spec, [], [])
    prefix = f"{root.id}/" if root.id else ""
    kept, skipped = _split(catalog, root.steps, set(wanted), prefix)
    if not kept:  # nothing would run: the wanted fields come from no stage; run the pipeline as written
        return Plan(spec, [], [])
    lean = spec.model_copy(update={"root": root.model_copy(update={"steps": kept})})
    return Plan(lean, skipped, _publishable(catalog, root, kept, wanted))


def _split(catalog: Catalog, steps: list[AnyNode], needed: set[str],
           prefix: str) -> tuple[list[AnyNode], list[Decision]]:
    kept: list[AnyNode] = []
    skipped: list[Decision] = []
    for step in reversed(steps):
        if isinstance(step, StageNode) and not writes(catalog, step) & needed:
            skipped.append(_skip_record(catalog, step, prefix))
            continue
        kept.insert(0, step)
        needed |= reads(catalog, step)
    return kept, list(reversed(skipped))


def _skip_record(catalog: Catalog, step: StageNode, prefix: str) -> Decision:
    outputs = sorted(writes(catalog, step))
    return Decision(node=prefix + (step.id or step.stage), kind="lazy", choice="skipped",
                    detail={"stage": step.stage, "outputs": outputs,
                            "reason": "no later node reads these fields and the job does not return them"})


def writes(catalog: Catalog, node: StageNode) -> set[str]:
    """State fields a stage node writes (its output fields, renamed by the node)."""
    spec = catalog.stage(node.stage, node.version)
    return {node.outputs.get(name, name) for name in spec.outputs}


def reads(catalog: Catalog, node: AnyNode) -> set[str]:
    """State fields a node may read: a stage's inputs; for any other node also every name it mentions."""
    if isinstance(node, StageNode):
        spec = catalog.stage(node.stage, node.version)
        return {node.inputs.get(name, name) for name in spec.inputs}
    found = set(_strings(node.model_dump(mode="json")))
    for inner in iter_nodes(node):
        if isinstance(inner, StageNode):
            found |= reads(catalog, inner)
    return found


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in [key, *_strings(item)]]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def _publishable(catalog: Catalog, root: SequenceNode, kept: list[AnyNode], wanted: list[str]) -> list[str]:
    stages = [n for n in iter_nodes(root.model_copy(update={"steps": kept})) if isinstance(n, StageNode)]
    mentioned = {name for s in kept if not isinstance(s, StageNode) for name in _strings(s.model_dump(mode="json"))}
    top = [s for s in kept if isinstance(s, StageNode)]
    return [field for field in wanted
            if sum(field in writes(catalog, s) for s in stages) == 1
            and any(field in writes(catalog, s) for s in top) and field not in mentioned]

