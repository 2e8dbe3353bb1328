"""A small Python API for pipeline specs, named like the nodes they build; it gives the same PipelineSpec as YAML.

    from contracts.builder import Branch, Loop, Map, Pipeline, Sequential, Stage, Until

    spec = Pipeline(
        "patterns_map",
        Sequential("key_terms", Map("define", over="key_terms", item="term",
                                    collect={"definition": "definitions"}, max_fanout=8, id="terms")),
        inputs={"question": "str"},
        outputs=["key_terms", "definitions"],
    )

A step is a stage name (str), a node, or a list of steps (a sequence). `add(spec, step, position)`
inserts a step into an existing pipeline's top-level sequence. `SubPipeline("qa")` runs a
catalog pipeline by name; `SubPipeline([...])` an inline one. `Hierarchical(...)` takes modules,
pipelines and conditionals like a `structure:` file (contracts/structure.py).
"""

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from contracts.specs import (
    AdaptiveNode,
    BranchNode,
    LMOverride,
    LoopNode,
    MapNode,
    Node,
    PipelineSpec,
    SequenceNode,
    StageNode,
    StopCondition,
    SubPipelineNode,
)
from contracts.structure import DEFAULT_MAX_DEPTH, Conditional, Structure

Step = str | Node | StageNode | Sequence[Any]

# The functions are named like the nodes they build (`Map(...)`, `Loop(...)`), hence the capitals.


def node_of(step: Step) -> Any:
    """A step as a node: a stage name, a node as is, a list as a sequence."""
    if isinstance(step, str):
        return StageNode(stage=step)
    if isinstance(step, list | tuple):
        return Sequential(*step)
    return step


def Stage(
    name: str,
    *,
    inputs: Mapping[str, str] | None = None,
    outputs: Mapping[str, str] | None = None,
    critical: bool = True,
    lm: LMOverride | None = None,
    id: str | None = None,
) -> StageNode:
    return StageNode(id=id, stage=name, inputs=dict(inputs or {}), outputs=dict(outputs or {}), critical=critical,
                     lm=lm)


def Sequential(*steps: Step, id: str | None = None) -> SequenceNode:
    return SequenceNode(id=id, steps=[node_of(step) for step in steps])


def SubPipeline(target: str | Step, *, id: str | None = None) -> SubPipelineNode:
    """A catalog pipeline by name (a str), or an inline node/sequence."""
    if isinstance(target, str):
        return SubPipelineNode(id=id, pipeline=target)
    return SubPipelineNode(id=id, node=node_of(target))


def Branch(
    field: str,
    branches: Mapping[str, Step],
    *,
    router: str | StageNode | None = None,
    default: str | None = None,
    id: str | None = None,
) -> BranchNode:
    routed = StageNode(stage=router) if isinstance(router, str) else router
    return BranchNode(id=id, router=routed, field=field, branches={k: node_of(v) for k, v in branches.items()},
                      default=default)


def Until(field: str, threshold: float, direction: Literal["above", "below"] = "above") -> StopCondition:
    return StopCondition(field=field, threshold=threshold, direction=direction)


def Loop(
    body: Step,
    *,
    max_iterations: int = 3,
    until: StopCondition | None = None,
    patience: int | None = None,
    epsilon: float = 0.0,
    score_field: str | None = None,
    record: Sequence[str] = (),
    id: str | None = None,
) -> LoopNode:
    return LoopNode(id=id, body=node_of(body), max_iterations=max_iterations, until=until, patience=patience,
                    epsilon=epsilon, score_field=score_field, record=list(record))


def Map(
    node: Step,
    *,
    over: str,
    item: str,
    collect: Mapping[str, str],
    max_fanout: int = 32,
    overflow: Literal["fail", "truncate"] = "fail",
    on_error: Literal["fail", "drop"] = "fail",
    id: str | None = None,
) -> MapNode:
    return MapNode(id=id, over=over, item=item, node=node_of(node), collect=dict(collect), max_fanout=max_fanout,
                   overflow=overflow, on_error=on_error)


def Adaptive(
    text_field: str,
    structures: Mapping[str, Step],
    *,
    rules: Mapping[str, str] | None = None,
    default: str | None = None,
    complexity_threshold: float = 0.5,
    id: str | None = None,
) -> AdaptiveNode:
    return AdaptiveNode(id=id, text_field=text_field, structures={k: node_of(v) for k, v in structures.items()},
                        rules=dict(rules or {}), default=default, complexity_threshold=complexity_threshold)


def Pipeline(
    name: str,
    root: Step,
    *,
    inputs: Mapping[str, Any],
    outputs: Sequence[str] = (),
    version: str = "1",
    description: str = "",
    example: Mapping[str, Any] | None = None,
) -> PipelineSpec:
    return PipelineSpec.model_validate({
        "name": name, "version": version, "description": description, "inputs": dict(inputs),
        "outputs": list(outputs), "example": dict(example or {}), "root": node_of(root),
    })


def add(pipeline: PipelineSpec, step: Step, position: int | None = None) -> PipelineSpec:
    """The pipeline with `step` inserted into its top-level sequence at `position` (default: the end).

    Like `list.insert`, a negative position counts from the end. A pipeline whose root is a single
    node becomes a sequence of that node and the new step. The input spec is left unchanged.
    """
    root = pipeline.root
    steps = list(root.steps) if isinstance(root, SequenceNode) and root.id is None else [root]
    steps.insert(len(steps) if position is None else position, node_of(step))
    return PipelineSpec.model_validate({**pipeline.model_dump(mode="json"),
                                        "root": SequenceNode(steps=steps).model_dump(mode="json")})


def Hierarchical(
    name: str,
    *,
    inputs: Mapping[str, Any],
    modules: Mapping[str, str | StageNode],
    pipelines: Mapping[str, Sequence[Any]],
    conditionals: Mapping[str, Conditional] | None = None,
    entry: str = "main",
    outputs: Sequence[str] = (),
    version: str = "1",
    description: str = "",
    example: Mapping[str, Any] | None = None,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> PipelineSpec:
    """A structure of named modules, pipelines and conditionals, resolved like a `structure:` file."""
    structure = Structure.model_validate({
        "name": name, "version": version, "description": description, "inputs": dict(inputs),
        "outputs": list(outputs), "example": dict(example or {}), "entry": entry,
        "modules": {k: v.model_dump(mode="json") if isinstance(v, StageNode) else v for k, v in modules.items()},
        "pipelines": {k: [_plain(step) for step in steps] for k, steps in pipelines.items()},
        "conditionals": dict(conditionals or {}),
    })
    return structure.to_pipeline(max_depth)


def When(
    field: str, branches: Mapping[str, Any], *, router: str | None = None, default: str | None = None
) -> Conditional:
    """A conditional of a Hierarchical structure: branch targets name modules/pipelines or are nodes."""
    return Conditional(field=field, branches={k: _plain(v) for k, v in branches.items()}, router=router,
                       default=default)


def _plain(step: Any) -> Any:
    """Names stay names (resolved by the structure); nodes become their data."""
    if isinstance(step, str):
        return step
    if isinstance(step, list | tuple):
        return {"kind": "sequence", "steps": [_plain(s) for s in step]}
    return step.model_dump(mode="json")


__all__ = ["Adaptive", "Branch", "Conditional", "Hierarchical", "Loop", "Map", "Pipeline", "Sequential", "Stage",
           "SubPipeline", "Until", "When", "add", "node_of"]
