"""Hierarchical structure files: modules, pipelines and conditionals, resolved into one PipelineSpec.

A structure describes a hierarchical program of reusable parts: named modules
(stages), named pipelines (lists of steps) and named conditionals (a branch on a state field,
optionally after a router module), with an entry pipeline. Steps and branch targets name any of
those, or are inline nodes in the usual pipeline syntax (a map, a sub-pipeline by name...).

```yaml
structure:
  name: study_and_answer
  inputs: {question: str}
  outputs: [answer]
  entry: main
  modules: {terms: key_terms, classify: classify_task, short: short_answer, long: essay}
  pipelines:
    main: [terms, respond]
    respond: [by_type]
  conditionals:
    by_type: {router: classify, field: task_type, branches: {essay: long}, default: short}
```

Resolution happens when the file loads: a named pipeline becomes an inline sub-pipeline node (its
name is a level of the node paths), a module a stage node with the module's name as id, a
conditional a branch node. Unknown names, a name defined twice, cycles and nesting deeper than
`max_depth` are SpecErrors naming the structure and the path through it.
"""

from typing import Any

from pydantic import Field, TypeAdapter, ValidationError

from contracts.errors import SpecError
from contracts.fields import Fields
from contracts.specs import (
    BranchNode,
    Model,
    Node,
    PipelineSpec,
    SequenceNode,
    StageNode,
    SubPipelineNode,
    _normalise_tree,
    normalise_node,
)

DEFAULT_MAX_DEPTH = 8
_NODE: TypeAdapter[Any] = TypeAdapter(Node)


class Conditional(Model):
    """Branch on a state field, read after the (optional) router module has run."""

    router: str | None = Field(None, description="a module name")
    field: str
    branches: dict[str, Any] = Field(min_length=1, description="value -> name or inline node")
    default: str | None = None


class Structure(Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9_\-]*$")
    version: str = "1"
    description: str = ""
    inputs: Fields
    outputs: list[str] = Field(default_factory=list)
    example: dict[str, Any] = Field(default_factory=dict)
    entry: str = "main"
    modules: dict[str, Any] = Field(default_factory=dict, description="name -> stage name or stage node")
    pipelines: dict[str, list[Any]] = Field(default_factory=dict, description="name -> steps")
    conditionals: dict[str, Conditional] = Field(default_factory=dict)

    def to_pipeline(self, max_depth: int = DEFAULT_MAX_DEPTH) -> PipelineSpec:
        resolver = _Resolver(self, max_depth)
        if self.entry not in self.pipelines:
            raise resolver.error(f"entry '{self.entry}' is not a pipeline; pipelines: {_names(self.pipelines)}")
        root = resolver.sequence(self.entry, [self.entry])
        return PipelineSpec(name=self.name, version=self.version, description=self.description, inputs=self.inputs,
                            outputs=self.outputs, example=self.example, root=root)


class _Resolver:
    def __init__(self, structure: Structure, max_depth: int) -> None:
        self.s = structure
        self.max_depth = max_depth
        self._check_unique_names()

    def error(self, message: str) -> SpecError:
        return SpecError(f"structure '{self.s.name}': {message}")

    def _check_unique_names(self) -> None:
        sections = {"modules": self.s.modules, "pipelines": self.s.pipelines, "conditionals": self.s.conditionals}
        seen: dict[str, str] = {}
        for section, names in sections.items():
            for name in names:
                if name in seen:
                    raise self.error(f"name '{name}' is defined in both {seen[name]} and {section}")
                seen[name] = section

    def sequence(self, name: str, stack: list[str]) -> SequenceNode:
        return SequenceNode(steps=[self.step(step, stack) for step in self.s.pipelines[name]])

    def step(self, step: Any, stack: list[str]) -> Any:
        if isinstance(step, str):
            return self.ref(step, stack)
        try:
            return _NODE.validate_python(_normalise_tree(step))
        except ValidationError as error:
            raise self.error(f"inline node in {' -> '.join(stack)} is invalid:\n{error}") from None

    def ref(self, name: str, stack: list[str]) -> Any:
        if name in self.s.modules:
            return self.module(name)
        if name not in self.s.pipelines and name not in self.s.conditionals:
            known = _names({**self.s.modules, **self.s.pipelines, **self.s.conditionals})
            raise self.error(f"unknown name '{name}' in {' -> '.join(stack)}; known: {known}")
        if name in stack:
            raise self.error(f"cycle: {' -> '.join([*stack, name])}")
        if len(stack) >= self.max_depth:
            raise self.error(f"nesting deeper than {self.max_depth}: {' -> '.join([*stack, name])}")
        if name in self.s.pipelines:
            return SubPipelineNode(id=name, node=self.sequence(name, [*stack, name]))
        return self.conditional(name, [*stack, name])

    def module(self, name: str) -> StageNode:
        try:
            stage = StageNode.model_validate(normalise_node(self.s.modules[name]))
        except ValidationError as error:
            raise self.error(f"module '{name}' is not a stage:\n{error}") from None
        return stage.model_copy(update={"id": stage.id or name})

    def conditional(self, name: str, stack: list[str]) -> BranchNode:
        spec = self.s.conditionals[name]
        router = None
        if spec.router is not None:
            if spec.router not in self.s.modules:
                raise self.error(f"conditional '{name}': router '{spec.router}' is not a module; "
                                 f"modules: {_names(self.s.modules)}")
            router = self.module(spec.router)
        branches = {value: self.step(target, stack) for value, target in spec.branches.items()}
        try:
            return BranchNode(id=name, router=router, field=spec.field, branches=branches, default=spec.default)
        except ValidationError as error:
            raise self.error(f"conditional '{name}' is invalid:\n{error}") from None


def _names(items: dict[str, Any]) -> str:
    return ", ".join(sorted(items)) or "none"


def load_structure(raw: Any, max_depth: int = DEFAULT_MAX_DEPTH) -> PipelineSpec:
    """A structure document (parsed YAML/JSON) as the PipelineSpec it describes."""
    try:
        structure = Structure.model_validate(raw)
    except ValidationError as error:
        name = raw.get("name", "?") if isinstance(raw, dict) else "?"
        raise SpecError(f"structure '{name}' is invalid:\n{error}") from None
    return structure.to_pipeline(max_depth)
