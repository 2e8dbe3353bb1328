"""JSON Schemas of a pipeline's request and of its JobResult, generated from the contracts.

A service in any language validates a request before it enqueues `pipeline.run`, and reads the result
knowing each answer field's type. The request schema is the pipeline's input contract (the same pydantic
model `pipeline.run` validates with); the result schema is `JobResult` with `answer` and `fields` typed
by the stage output contracts that produce each state field. Used by `stagecoach schema PIPELINE` and
by the monitor's HTTP endpoint (both import only this module).
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from contracts.catalog import Catalog
from contracts.fields import Fields, FieldSpec, build_model
from contracts.jobs import JobRequest, JobResult
from contracts.specs import AnyNode, EnsembleNode, MapNode, PipelineSpec, StageNode, SubPipelineNode, children

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
ANY = "any"


def pipeline_schemas(catalog: Catalog, name: str) -> dict[str, Any]:
    """`{"pipeline", "version", "request", "result"}`: both JSON Schemas (draft 2020-12) of one pipeline."""
    spec = catalog.pipeline(name)
    return {"pipeline": spec.name, "version": spec.version,
            "request": request_schema(catalog, name), "result": result_schema(catalog, name)}


def request_schema(catalog: Catalog, name: str) -> dict[str, Any]:
    """The payload of `pipeline.run` for this pipeline: its name and inputs of the declared types."""
    spec = catalog.pipeline(name)
    inputs = build_model(f"{_title(name)}Inputs", spec.inputs)
    needed = any(field.required and field.default is None for field in spec.inputs.values())
    model = create_model(  # type: ignore[call-overload]
        f"{_title(name)}Request", __base__=JobRequest, __doc__=f"A request to run pipeline '{name}'.",
        pipeline=(_const(name), ...), inputs=(inputs, ... if needed else Field(default_factory=dict)),
    )
    return _with_dialect(model.model_json_schema())


def result_schema(catalog: Catalog, name: str) -> dict[str, Any]:
    """JobResult with `answer` (the declared outputs, empty when the job failed) and `fields` typed."""
    spec = catalog.pipeline(name)
    types = state_types(catalog, spec)
    declared = {out: types.get(out, FieldSpec(type=ANY)) for out in spec.outputs}
    answer = _optional_model(f"{_title(name)}Answer", declared, extra="forbid")
    fields = _optional_model(f"{_title(name)}Fields", types, extra="allow")
    model = create_model(  # type: ignore[call-overload]
        f"{_title(name)}JobResult", __base__=JobResult, __doc__=f"A finished job of pipeline '{name}'.",
        pipeline=(_const(name), ...),
        answer=(answer, Field(default_factory=dict, description="the pipeline's declared outputs; empty if failed")),
        fields=(fields, Field(default_factory=dict, description="every state field at the end")),
    )
    return _with_dialect(model.model_json_schema())


def state_types(catalog: Catalog, spec: PipelineSpec) -> Fields:
    """The declared type of every state field a job of this pipeline may hold: its inputs, each stage's
    outputs (under their state names), lists gathered by maps. A field two contracts type differently
    is left untyped rather than typed wrongly."""
    found: dict[str, FieldSpec] = {}
    _merge(found, spec.inputs)
    _walk(catalog, spec.root, found, set())
    return found


def _walk(catalog: Catalog, node: AnyNode, found: dict[str, FieldSpec], seen: set[str]) -> None:
    if isinstance(node, StageNode):
        stage = catalog.stage(node.stage)
        _merge(found, {node.outputs.get(field, field): fs for field, fs in stage.outputs.items()})
        return
    if isinstance(node, SubPipelineNode) and node.pipeline is not None:
        if node.pipeline not in seen:
            _walk(catalog, catalog.pipeline(node.pipeline).root, found, seen | {node.pipeline})
        return
    inner: dict[str, FieldSpec] = {}
    for child in children(node):
        _walk(catalog, child, inner, seen)
    _merge(found, inner)
    if isinstance(node, MapNode):
        _merge(found, {target: _list_of(inner.get(source)) for source, target in node.collect.items()})
    if isinstance(node, EnsembleNode):
        _merge(found, {node.report_field: FieldSpec(type="dict")})


def _merge(found: dict[str, FieldSpec], new: Fields) -> None:
    for name, spec in new.items():
        previous = found.get(name)
        found[name] = spec if previous is None or previous.type == spec.type else FieldSpec(type=ANY)


def _list_of(item: FieldSpec | None) -> FieldSpec:
    return FieldSpec(type=f"list[{item.type if item else ANY}]")


def _optional_model(name: str, fields: Fields, extra: Literal["forbid", "allow"]) -> type[BaseModel]:
    """A model of these fields, none required (a failed job has none of them), nulls not allowed."""
    definitions: dict[str, Any] = {
        field: (spec.annotation(), Field(None, description=spec.description or None))
        for field, spec in sorted(fields.items())
    }
    model: type[BaseModel] = create_model(name, __config__=ConfigDict(extra=extra), **definitions)  # type: ignore[call-overload]
    return model


def _const(value: str) -> Any:
    """`Literal[value]` for a value known only at run time (JSON Schema `const`)."""
    return Literal[value]


def _with_dialect(schema: dict[str, Any]) -> dict[str, Any]:
    return {"$schema": SCHEMA_DIALECT, **schema}


def _title(name: str) -> str:
    return "".join(part.capitalize() for part in name.replace("-", "_").split("_"))
