"""The node kinds whose shape is known before the job starts: stage, sequence, subpipeline.

A sequence fuses runs of adjacent stages whose specs say `fusible: true` into one `stage.fused`
task on the first stage's queue: one hop instead of several, each stage recorded as if alone.
"""

from celery import chain
from celery.canvas import Signature

from contracts.catalog import Catalog
from contracts.names import FUSED_TASK, MAX_FUSED_STEPS, stage_queue
from contracts.specs import AnyNode, SequenceNode, StageNode, SubPipelineNode
from routing.compile import Compiler
from routing.kinds import NodeKind


def compile_stage(compiler: Compiler, node: StageNode, prefix: str) -> Signature:
    return compiler.stage(node, prefix)


def compile_sequence(compiler: Compiler, node: SequenceNode, prefix: str) -> Signature:
    inner = prefix + f"{node.id}/" if node.id else prefix
    return chain(*(_compile_run(compiler, run, inner) for run in fusion_runs(compiler.catalog, node.steps)))


def fusion_runs(catalog: Catalog, steps: list[AnyNode]) -> list[list[AnyNode]]:
    """The steps grouped: adjacent fusible stage nodes together (at most MAX_FUSED_STEPS), others alone."""
    runs: list[list[AnyNode]] = []
    for step in steps:
        last = runs[-1] if runs else []
        if last and len(last) < MAX_FUSED_STEPS and _fusible(catalog, step) and _fusible(catalog, last[-1]):
            last.append(step)
        else:
            runs.append([step])
    return runs


def _fusible(catalog: Catalog, step: AnyNode) -> bool:
    # a node with its own time limit keeps its own task: the limit is set on that task's signature
    if not isinstance(step, StageNode) or step.time_limit is not None:
        return False
    return bool(catalog.stage(step.stage, step.version).fusible)


def _compile_run(compiler: Compiler, run: list[AnyNode], prefix: str) -> Signature:
    if len(run) == 1:
        return compiler.node(run[0], prefix)
    stages = [step for step in run if isinstance(step, StageNode)]
    steps = [{"node": step.model_dump(mode="json"), "path": prefix + (step.id or step.stage)} for step in stages]
    first = compiler.catalog.stage_ref(stages[0].stage, stages[0].version)
    return compiler.app.signature(FUSED_TASK, kwargs={"steps": steps}, queue=stage_queue(first))


def compile_subpipeline(compiler: Compiler, node: SubPipelineNode, prefix: str) -> Signature:
    target = compiler.catalog.pipeline(node.pipeline).root if node.pipeline else node.node
    assert target is not None  # the spec validator guarantees one of the two
    name = node.id or node.pipeline or "sub"
    return compiler.node(target, f"{prefix}{name}/")


STAGE = NodeKind(compile=compile_stage)
SEQUENCE = NodeKind(compile=compile_sequence)
SUBPIPELINE = NodeKind(compile=compile_subpipeline)
