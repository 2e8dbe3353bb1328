"""`stagecoach schema PIPELINE`: the JSON Schemas of the pipeline's request and of its JobResult."""

from typing import Any, Literal

from contracts.catalog import Catalog
from contracts.schema import pipeline_schemas

Part = Literal["both", "request", "result"]


def schema_document(catalog: Catalog, pipeline: str, part: Part = "both") -> dict[str, Any]:
    """Both schemas under `request` and `result`, or only the one asked for (a plain JSON Schema)."""
    schemas = pipeline_schemas(catalog, pipeline)
    return schemas if part == "both" else dict(schemas[part])
