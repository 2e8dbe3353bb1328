"""What `stagecoach pipelines` reports: each pipeline's stages, node kinds and input fields."""

from typing import Any

from contracts.catalog import Catalog, pipeline_kinds, pipeline_stages
from contracts.specs import PipelineSpec

__all__ = ["describe", "describe_all", "pipeline_kinds", "pipeline_stages"]


def describe(catalog: Catalog, spec: PipelineSpec) -> dict[str, Any]:
    """The pipeline spec as JSON plus the stages and node kinds it uses."""
    return {**spec.model_dump(mode="json"), "stages": pipeline_stages(catalog, spec),
            "kinds": pipeline_kinds(catalog, spec)}


def describe_all(catalog: Catalog) -> list[dict[str, Any]]:
    return [describe(catalog, catalog.pipelines[name]) for name in sorted(catalog.pipelines)]
