"""The catalog: every stage and pipeline definition, loaded from YAML/JSON files and checked.

A file holds `stages:` (a list), and `pipeline:` or `pipelines:`. Stage names are global (a stage
is a queue); a pipeline may use stages defined in any file. Checks at load: every referenced
stage and sub-pipeline exists, sub-pipelines form no cycle and nest no deeper than MAX_DEPTH.
A `structure:` (contracts/structure.py) is a hierarchical program resolved into one pipeline.
"""

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from contracts.errors import SpecError, UnknownPipelineError, UnknownStageError
from contracts.fields import validate
from contracts.specs import AnyNode, PipelineSpec, StageNode, StageSpec, SubPipelineNode, children
from contracts.structure import load_structure

MAX_DEPTH = 8
M = TypeVar("M", bound=BaseModel)
SPEC_SUFFIXES = (".yaml", ".yml", ".json")


class Catalog(BaseModel):
    stages: dict[str, StageSpec] = {}
    pipelines: dict[str, PipelineSpec] = {}

    def stage(self, name: str) -> StageSpec:
        if name not in self.stages:
            raise UnknownStageError(name, list(self.stages))
        return self.stages[name]

    def pipeline(self, name: str) -> PipelineSpec:
        if name not in self.pipelines:
            raise UnknownPipelineError(name, list(self.pipelines))
        return self.pipelines[name]

    def validate_inputs(self, pipeline: str, inputs: dict[str, Any]) -> dict[str, Any]:
        """The pipeline's input contract applied to a request; raises ContractError naming fields."""
        spec = self.pipeline(pipeline)
        return validate(f"pipeline '{pipeline}' inputs", spec.inputs, inputs)

    def with_stage(self, spec: StageSpec) -> "Catalog":
        return self.model_copy(update={"stages": {**self.stages, spec.name: spec}})


def load_catalog(paths: Iterable[Path | str]) -> Catalog:
    """Load and check every spec file found at the given files or folders."""
    stages: dict[str, StageSpec] = {}
    pipelines: dict[str, PipelineSpec] = {}
    for file in _spec_files(paths):
        doc = _read(file)
        for stage in _parse_stages(file, doc):
            _add_unique(stages, stage.name, stage, file, "stage")
        for pipeline in _parse_pipelines(file, doc):
            _add_unique(pipelines, pipeline.name, pipeline, file, "pipeline")
    catalog = Catalog(stages=stages, pipelines=pipelines)
    check_catalog(catalog)
    return catalog


def check_catalog(catalog: Catalog) -> None:
    for pipeline in catalog.pipelines.values():
        for node in iter_nodes(pipeline.root):
            if isinstance(node, StageNode) and node.stage not in catalog.stages:
                raise SpecError(f"pipeline '{pipeline.name}': {UnknownStageError(node.stage, list(catalog.stages))}")
            if isinstance(node, SubPipelineNode) and node.pipeline and node.pipeline not in catalog.pipelines:
                known = list(catalog.pipelines)
                raise SpecError(f"pipeline '{pipeline.name}': {UnknownPipelineError(node.pipeline, known)}")
        _check_nesting(catalog, pipeline.name, [])


def _check_nesting(catalog: Catalog, name: str, stack: list[str]) -> None:
    if name in stack:
        raise SpecError(f"sub-pipeline cycle: {' -> '.join([*stack, name])}")
    if len(stack) >= MAX_DEPTH:
        raise SpecError(f"sub-pipelines nest deeper than {MAX_DEPTH}: {' -> '.join([*stack, name])}")
    _check_subtree(catalog, catalog.pipelines[name].root, [*stack, name])


def _check_subtree(catalog: Catalog, node: AnyNode, stack: list[str]) -> None:
    """Named sub-pipelines are followed; inline ones count as a level too, shown as `(id)`."""
    if isinstance(node, SubPipelineNode):
        if node.pipeline is not None:
            _check_nesting(catalog, node.pipeline, stack)
            return
        label = f"({node.id or 'inline'})"
        if len(stack) >= MAX_DEPTH:
            raise SpecError(f"sub-pipelines nest deeper than {MAX_DEPTH}: {' -> '.join([*stack, label])}")
        stack = [*stack, label]
    for child in children(node):
        _check_subtree(catalog, child, stack)


def iter_nodes(node: AnyNode) -> Iterator[AnyNode]:
    """Every node of a tree, depth first, not entering named sub-pipelines."""
    yield node
    for child in children(node):
        yield from iter_nodes(child)


def _spec_files(paths: Iterable[Path | str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix in SPEC_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise SpecError(f"catalog path not found: {path}")
    return files


def _read(file: Path) -> dict[str, Any]:
    try:
        text = file.read_text()
        doc = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise SpecError(f"{file}: cannot read spec file: {error}") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{file}: a spec file holds a mapping with 'stages' and/or 'pipeline(s)'")
    unknown = set(doc) - {"stages", "pipeline", "pipelines", "structure", "structures"}
    if unknown:
        raise SpecError(
            f"{file}: unknown top-level keys {sorted(unknown)}; use stages, pipeline, pipelines, structure, structures"
        )
    return doc


def _parse_stages(file: Path, doc: dict[str, Any]) -> list[StageSpec]:
    return [_parse(file, StageSpec, raw).resolve_state(file.parent) for raw in doc.get("stages") or []]


def _parse_pipelines(file: Path, doc: dict[str, Any]) -> list[PipelineSpec]:
    raws = list(doc.get("pipelines") or []) + ([doc["pipeline"]] if doc.get("pipeline") else [])
    structures = list(doc.get("structures") or []) + ([doc["structure"]] if doc.get("structure") else [])
    return [_parse(file, PipelineSpec, raw) for raw in raws] + [_structure(file, raw) for raw in structures]


def _structure(file: Path, raw: Any) -> PipelineSpec:
    try:
        return load_structure(raw, MAX_DEPTH)
    except SpecError as error:
        raise SpecError(f"{file}: {error}") from None


def _parse(file: Path, model: type[M], raw: Any) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        name = raw.get("name", "?") if isinstance(raw, dict) else "?"
        raise SpecError(f"{file}: {model.__name__} '{name}' is invalid:\n{error}") from None


def _add_unique(into: dict[str, Any], name: str, item: BaseModel, file: Path, what: str) -> None:
    if name in into and into[name] != item:
        raise SpecError(f"{file}: {what} '{name}' is defined twice with different contents")
    into[name] = item
