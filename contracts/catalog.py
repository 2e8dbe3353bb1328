"""The catalog: every stage and pipeline definition, loaded from YAML/JSON files and checked.

A file holds `stages:` (a list), and `pipeline:` or `pipelines:`. Stage names are global (a stage
is a queue); a pipeline may use stages defined in any file. Several versions of one stage or
pipeline may coexist: the latest is keyed by its bare name (so `stage.answer` keeps its meaning),
every other version by `name@version` (its own queue, `stage.answer@1`). Checks at load: every referenced
stage and sub-pipeline exists, sub-pipelines form no cycle and nest no deeper than MAX_DEPTH.
A `structure:` (contracts/structure.py) is a hierarchical program resolved into one pipeline.
"""

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from contracts.errors import (
    ContractError,
    FieldProblem,
    SpecError,
    UnknownPipelineError,
    UnknownStageError,
    UnknownVersionError,
)
from contracts.fields import validate
from contracts.names import split_ref, versioned
from contracts.specs import AnyNode, PipelineSpec, StageNode, StageSpec, SubPipelineNode, children
from contracts.structure import load_structure

MAX_DEPTH = 8
M = TypeVar("M", bound=BaseModel)
SPEC_SUFFIXES = (".yaml", ".yml", ".json")
STATES_FOLDER = "states"  # saved stage states (DSPy JSON) under a catalog folder are not specs


class Catalog(BaseModel):
    """Stages and pipelines keyed by ref: the bare name for the latest version, `name@version` else."""

    stages: dict[str, StageSpec] = {}
    pipelines: dict[str, PipelineSpec] = {}

    def stage(self, name: str, version: str | None = None) -> StageSpec:
        return self.stages[self.stage_ref(name, version)]

    def stage_ref(self, name: str, version: str | None = None) -> str:
        """The key (and task/queue suffix) of a stage given as `name`, `name@version` or name + version."""
        return _resolve(self.stages, "stage", name, version)

    def pipeline(self, name: str, version: str | None = None) -> PipelineSpec:
        return self.pipelines[self.pipeline_ref(name, version)]

    def pipeline_ref(self, name: str, version: str | None = None) -> str:
        return _resolve(self.pipelines, "pipeline", name, version)

    def validate_inputs(self, pipeline: str, inputs: dict[str, Any], version: str | None = None) -> dict[str, Any]:
        """The pipeline's input contract applied to a request; raises ContractError naming fields."""
        spec = self.pipeline(pipeline, version)
        return validate(f"pipeline '{spec.name}' inputs", spec.inputs, inputs)

    def wanted_outputs(self, pipeline: str, outputs: list[str] | None, version: str | None = None) -> list[str]:
        """The outputs a request asks for: all declared ones, or a subset of them (else ContractError)."""
        spec = self.pipeline(pipeline, version)
        if outputs is None:
            return list(spec.outputs)
        problems = [FieldProblem("outputs", f"'{name}' is not an output of pipeline '{spec.name}'; outputs: "
                                            f"{', '.join(spec.outputs) or 'none'}")
                    for name in outputs if name not in spec.outputs]
        if problems:
            raise ContractError(f"pipeline '{spec.name}' request", problems)
        return list(dict.fromkeys(outputs))

    def with_stage(self, spec: StageSpec) -> "Catalog":
        return self.model_copy(update={"stages": _keyed([*self.stages.values(), spec], "stage")})


def _resolve(table: dict[str, Any], what: str, ref: str, version: str | None) -> str:
    name, pinned = split_ref(ref)
    if pinned is not None and version is not None and pinned != version:
        raise SpecError(f"{what} '{ref}' is pinned to version '{pinned}' and also asked for version '{version}'")
    wanted = pinned or version
    if name not in table:
        error = UnknownStageError if what == "stage" else UnknownPipelineError
        raise error(ref, sorted({split_ref(key)[0] for key in table}))
    if wanted is None or table[name].version == wanted:
        return name
    if versioned(name, wanted) in table:
        return versioned(name, wanted)
    raise UnknownVersionError(what, name, wanted, versions_of(table, name))


def versions_of(table: dict[str, Any], name: str) -> list[str]:
    """Every version of a stage or pipeline, oldest first."""
    found = [spec.version for key, spec in table.items() if split_ref(key)[0] == name]
    return sorted(found, key=version_order)


def version_order(version: str) -> tuple[tuple[int, int | str], ...]:
    """Numeric parts compare as numbers (`10` after `9`); text parts sort before numbers."""
    parts = version.replace("-", ".").replace("_", ".").split(".")
    return tuple((1, int(p)) if p.isdigit() else (0, p) for p in parts)


def _keyed(specs: list[Any], what: str) -> dict[str, Any]:
    """Latest version of each name under the bare name, the others under `name@version`. A `pinned_only`
    version is latest only when every version of the name is (an optimised version served beside the old)."""
    latest: dict[str, Any] = {}
    for spec in specs:
        current = latest.get(spec.name)
        if current is None or _newer(spec, current):
            latest[spec.name] = spec
    keyed = {name: spec for name, spec in latest.items()}
    for spec in specs:
        if spec is not latest[spec.name] and spec.version != latest[spec.name].version:
            keyed[versioned(spec.name, spec.version)] = spec
    return keyed


def _newer(spec: Any, current: Any) -> bool:
    pinned, held = getattr(spec, "pinned_only", False), getattr(current, "pinned_only", False)
    if pinned != held:
        return held  # any unpinned version wins over a pinned-only one
    return version_order(spec.version) > version_order(current.version)


def load_catalog(paths: Iterable[Path | str]) -> Catalog:
    """Load and check every spec file found at the given files or folders."""
    stages: dict[str, StageSpec] = {}
    pipelines: dict[str, PipelineSpec] = {}
    for file in _spec_files(paths):
        doc = _read(file)
        for stage in _parse_stages(file, doc):
            _add_unique(stages, versioned(stage.name, stage.version), stage, file, "stage")
        for pipeline in _parse_pipelines(file, doc):
            _add_unique(pipelines, versioned(pipeline.name, pipeline.version), pipeline, file, "pipeline")
    catalog = Catalog(stages=_keyed(list(stages.values()), "stage"),
                      pipelines=_keyed(list(pipelines.values()), "pipeline"))
    check_catalog(catalog)
    return catalog


def check_catalog(catalog: Catalog) -> None:
    for stage in catalog.stages.values():
        fallback = stage.on_error.stage
        if fallback is not None and (fallback not in catalog.stages or fallback == stage.name):
            raise SpecError(f"stage '{stage.name}': on_error fallback stage '{fallback}' is unknown or itself; "
                            f"known stages: {', '.join(sorted(catalog.stages))}")
    for key, pipeline in catalog.pipelines.items():
        for node in iter_nodes(pipeline.root):
            if isinstance(node, StageNode):
                _check_ref(key, lambda n=node: catalog.stage_ref(n.stage, n.version))
            if isinstance(node, SubPipelineNode) and node.pipeline:
                _check_ref(key, lambda n=node: catalog.pipeline(n.pipeline or ""))
        _check_nesting(catalog, key, [])
        _check_traffic(catalog, key, pipeline)


def _check_traffic(catalog: Catalog, key: str, pipeline: PipelineSpec) -> None:
    """A traffic split names versions of its own pipeline that exist."""
    if pipeline.traffic is None:
        return
    known = versions_of(catalog.pipelines, pipeline.name)
    unknown = sorted(set(pipeline.traffic) - set(known))
    if unknown:
        raise SpecError(f"pipeline '{key}': traffic names unknown version(s) {', '.join(unknown)}; "
                        f"known versions: {', '.join(known)}")


def _check_ref(pipeline: str, resolve: Any) -> None:
    try:
        resolve()
    except SpecError as error:
        raise SpecError(f"pipeline '{pipeline}': {error}") from None


def pin_versions(catalog: Catalog, spec: PipelineSpec) -> PipelineSpec:
    """The spec with every stage node naming the version it resolves to now and named sub-pipelines
    inlined (same node paths), so a running job keeps its versions even if the catalog changes."""
    root = _pin(catalog, spec.root.model_dump(mode="json"))
    return spec.model_copy(update={"root": PipelineSpec.model_validate({**spec.model_dump(), "root": root}).root})


def _pin(catalog: Catalog, node: Any) -> Any:
    if isinstance(node, list):
        return [_pin(catalog, item) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get("kind") == "stage":
        return {**node, "version": catalog.stage(node["stage"], node.get("version")).version}
    if node.get("kind") == "subpipeline" and node.get("pipeline"):
        inner = catalog.pipeline(node["pipeline"]).root.model_dump(mode="json")
        return {**node, "id": node.get("id") or node["pipeline"], "pipeline": None, "node": _pin(catalog, inner)}
    return {key: _pin(catalog, value) for key, value in node.items()}


def _check_nesting(catalog: Catalog, name: str, stack: list[str]) -> None:
    if name in stack:
        raise SpecError(f"sub-pipeline cycle: {' -> '.join([*stack, name])}")
    if len(stack) >= MAX_DEPTH:
        raise SpecError(f"sub-pipelines nest deeper than {MAX_DEPTH}: {' -> '.join([*stack, name])}")
    _check_subtree(catalog, catalog.pipeline(name).root, [*stack, name])


def _check_subtree(catalog: Catalog, node: AnyNode, stack: list[str]) -> None:
    """Named sub-pipelines are followed; inline ones count as a level too, shown as `(id)`."""
    if isinstance(node, SubPipelineNode):
        if node.pipeline is not None:
            _check_nesting(catalog, catalog.pipeline_ref(node.pipeline), stack)
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


STATIC_KINDS = frozenset({"stage", "sequence", "parallel", "ensemble"})  # every stage in them runs, once


def static_stage_count(spec: PipelineSpec) -> int | None:
    """How many stage calls a job of `spec` makes, when the tree alone says (None: a branch, loop, map,
    adaptive or sub-pipeline node decides at run time)."""
    nodes = list(iter_nodes(spec.root))
    if any(node.kind not in STATIC_KINDS for node in nodes):
        return None
    return sum(1 for node in nodes if node.kind == "stage")


def pipeline_stages(catalog: Catalog, spec: PipelineSpec) -> list[str]:
    """Every stage a job of this pipeline may run, in tree order, entering named sub-pipelines."""
    found: list[str] = []
    for node in _walk(catalog, spec):
        if isinstance(node, StageNode) and node.stage not in found:
            found.append(node.stage)
    return found


def pipeline_kinds(catalog: Catalog, spec: PipelineSpec) -> list[str]:
    found: list[str] = []
    for node in _walk(catalog, spec):
        if node.kind not in found:
            found.append(node.kind)
    return found


def _walk(catalog: Catalog, spec: PipelineSpec) -> list[Any]:
    nodes: list[Any] = []
    for node in iter_nodes(spec.root):
        nodes.append(node)
        if isinstance(node, SubPipelineNode) and node.pipeline in catalog.pipelines:
            nodes.extend(_walk(catalog, catalog.pipelines[node.pipeline]))
    return nodes


def _spec_files(paths: Iterable[Path | str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix in SPEC_SUFFIXES
                                and STATES_FOLDER not in p.relative_to(path).parts[:-1]))
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
