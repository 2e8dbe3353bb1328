"""Branch: a router stage's output picks one named branch at run time.

Compiled as `router stage -> pipeline.branch`; without a router just `pipeline.branch`, reading a
state field already there. The routing task normalises the value (case, spaces, dashes), matches
it against the branch names, records the decision in the trail and `outputs[<path>]`, and
replaces itself with the chosen branch (compiled under `<path>/<branch>/`). An unknown value
fails the job with a RoutingError naming the value and the known branches, unless the spec
names a default branch.
"""

from typing import Any

from celery import Task, chain
from celery.canvas import Signature

from contracts.envelope import Decision, Envelope
from contracts.specs import BranchNode
from routing.compile import Compiler, bind_input
from routing.errors import RoutingError
from routing.kinds import NodeKind
from routing.nodes.runtime import normalise_choice, state_value


def branch_path(node: BranchNode, prefix: str) -> str:
    return prefix + (node.id or "branch")


def compile_branch(compiler: Compiler, node: BranchNode, prefix: str) -> Signature:
    path = branch_path(node, prefix)
    decide = compiler.runtime(node, prefix)
    if node.router is None:
        return decide
    return chain(compiler.stage(node.router, f"{path}/"), decide)


def choose(node: BranchNode, value: Any, where: str) -> tuple[str, bool]:
    """The branch a router value selects, and whether it was the default."""
    wanted = normalise_choice(value)
    for name in node.branches:
        if normalise_choice(name) == wanted:
            return name, False
    if node.default is not None:
        return node.default, True
    known = ", ".join(sorted(node.branches))
    raise RoutingError(f"{where}: value {value!r} (normalised '{wanted}') matches no branch; known branches: {known}")


def decide(task: Task, compiler: Compiler, job: Envelope, raw: dict[str, Any], path: str) -> Any:
    node = BranchNode.model_validate(raw)
    where = f"branch '{path}'"
    value = state_value(job, node.field, where)
    name, defaulted = choose(node, value, where)
    detail = {"field": node.field, "value": value, "defaulted": defaulted}
    chosen = job.with_decision(Decision(node=path, kind="branch", choice=name, detail=detail))
    chosen = chosen.model_copy(update={"outputs": {**chosen.outputs, path: {"branch": name, **detail}}})
    canvas = compiler.node(node.branches[name], f"{path}/{name}/")
    return task.replace(bind_input(canvas, chosen.model_dump(mode="json")))


KIND = NodeKind(compile=compile_branch, decide=decide)
