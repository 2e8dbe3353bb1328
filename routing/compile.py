"""Compile a pipeline's node tree into Celery canvas.

Static structure becomes chain/group/chord up front. Runtime nodes (branch, loop, map, adaptive)
become one routing task each, which decides when the job reaches it and replaces itself with the
canvas it chose. Every task receives the envelope as its first argument; node paths are fixed here
so each output in the job is keyed by where it ran (`retrieve`, `hops[2]/retrieve`).
"""

from typing import Any

from celery import Celery, chain
from celery.canvas import Signature, _chain, chord, group

from contracts.catalog import Catalog
from contracts.names import FINISH_TASK, ROUTING_QUEUE, routing_task, stage_queue, stage_task
from contracts.specs import RUNTIME_KINDS, Node, PipelineSpec, SequenceNode, StageNode, SubPipelineNode
from routing.registry import STATIC_COMPILERS


class Compiler:
    def __init__(self, app: Celery, catalog: Catalog) -> None:
        self.app = app
        self.catalog = catalog

    def pipeline(self, spec: PipelineSpec) -> Signature:
        """The whole job: the root node then `pipeline.finish`, which builds the JobResult."""
        finish = self.app.signature(FINISH_TASK, kwargs={"outputs": spec.outputs}, queue=ROUTING_QUEUE)
        return chain(self.node(spec.root, ""), finish)

    def node(self, node: Node | StageNode, prefix: str) -> Signature:
        # a runtime kind may register a compiler too (a branch runs its router stage first)
        if node.kind in STATIC_COMPILERS:
            return STATIC_COMPILERS[node.kind](self, node, prefix)
        if node.kind in RUNTIME_KINDS:
            return self.runtime(node, prefix)  # type: ignore[arg-type]
        raise NotImplementedError(f"no compiler for node kind '{node.kind}'")

    def runtime(self, node: Node, prefix: str) -> Signature:
        path = prefix + (node.id or node.kind)
        kwargs = {"node": node.model_dump(mode="json"), "path": path}
        return self.app.signature(routing_task(node.kind), kwargs=kwargs, queue=ROUTING_QUEUE)

    def stage(self, node: StageNode, prefix: str) -> Signature:
        path = prefix + (node.id or node.stage)
        self.catalog.stage(node.stage)
        kwargs = {"node": node.model_dump(mode="json"), "path": path}
        return self.app.signature(stage_task(node.stage), kwargs=kwargs, queue=stage_queue(node.stage))


def _compile_stage(compiler: Compiler, node: StageNode, prefix: str) -> Signature:
    return compiler.stage(node, prefix)


def _compile_sequence(compiler: Compiler, node: SequenceNode, prefix: str) -> Signature:
    inner = prefix + f"{node.id}/" if node.id else prefix
    return chain(*(compiler.node(step, inner) for step in node.steps))


def _compile_subpipeline(compiler: Compiler, node: SubPipelineNode, prefix: str) -> Signature:
    target = compiler.catalog.pipeline(node.pipeline).root if node.pipeline else node.node
    assert target is not None  # the spec validator guarantees one of the two
    name = node.id or node.pipeline or "sub"
    return compiler.node(target, f"{prefix}{name}/")


STATIC_COMPILERS.update(
    {"stage": _compile_stage, "sequence": _compile_sequence, "subpipeline": _compile_subpipeline}
)


def bind_input(sig: Signature, envelope: dict[str, Any]) -> Signature:
    """Give the envelope to the first task(s) of a canvas (chain args are lost when chains merge)."""
    if isinstance(sig, _chain):
        first, *rest = sig.tasks
        return chain(bind_input(first, envelope), *rest)
    if isinstance(sig, chord):
        return chord(bind_input(sig.tasks, envelope), sig.body)
    if isinstance(sig, group):
        return group(*(bind_input(t, envelope) for t in sig.tasks))
    return sig.clone(args=(envelope,))
