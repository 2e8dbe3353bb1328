"""The node kinds whose shape is known before the job starts: stage, sequence, subpipeline."""

from celery import chain
from celery.canvas import Signature

from contracts.specs import SequenceNode, StageNode, SubPipelineNode
from routing.compile import Compiler
from routing.kinds import NodeKind


def compile_stage(compiler: Compiler, node: StageNode, prefix: str) -> Signature:
    return compiler.stage(node, prefix)


def compile_sequence(compiler: Compiler, node: SequenceNode, prefix: str) -> Signature:
    inner = prefix + f"{node.id}/" if node.id else prefix
    return chain(*(compiler.node(step, inner) for step in node.steps))


def compile_subpipeline(compiler: Compiler, node: SubPipelineNode, prefix: str) -> Signature:
    target = compiler.catalog.pipeline(node.pipeline).root if node.pipeline else node.node
    assert target is not None  # the spec validator guarantees one of the two
    name = node.id or node.pipeline or "sub"
    return compiler.node(target, f"{prefix}{name}/")


STAGE = NodeKind(compile=compile_stage)
SEQUENCE = NodeKind(compile=compile_sequence)
SUBPIPELINE = NodeKind(compile=compile_subpipeline)
