"""What the API tells about pipelines, from the catalog (a pipeline's webhook secret never leaves)."""

from typing import Any

from api.models import PipelineDetail, PipelineInfo
from contracts.catalog import Catalog, pipeline_kinds, pipeline_stages, versions_of
from contracts.names import split_ref
from contracts.schema import pipeline_schemas


def names(catalog: Catalog) -> list[str]:
    return sorted({split_ref(ref)[0] for ref in catalog.pipelines})


def info(catalog: Catalog, ref: str) -> PipelineInfo:
    spec = catalog.pipeline(ref)
    return PipelineInfo(
        name=spec.name, version=spec.version, versions=versions_of(catalog.pipelines, spec.name),
        description=spec.description, inputs={k: v.model_dump(mode="json") for k, v in spec.inputs.items()},
        outputs=spec.outputs, stages=pipeline_stages(catalog, spec), kinds=pipeline_kinds(catalog, spec),
        max_queued=spec.max_queued, webhook_url=spec.webhook.url if spec.webhook else None, example=spec.example)


def detail(catalog: Catalog, ref: str) -> PipelineDetail:
    spec = catalog.pipeline(ref)
    shown: dict[str, Any] = spec.model_dump(mode="json", exclude={"webhook"})
    return PipelineDetail(**info(catalog, ref).model_dump(), spec=shown, schemas=pipeline_schemas(catalog, ref))
