"""What `stagecoach pipelines` reports: each pipeline's stages, node kinds and input fields."""

from typing import Any

from contracts.catalog import Catalog, iter_nodes
from contracts.specs import PipelineSpec, StageNode, SubPipelineNode


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


def describe(catalog: Catalog, spec: PipelineSpec) -> dict[str, Any]:
    """The pipeline spec as JSON plus the stages and node kinds it uses."""
    return {**spec.model_dump(mode="json"), "stages": pipeline_stages(catalog, spec),
            "kinds": pipeline_kinds(catalog, spec)}


def describe_all(catalog: Catalog) -> list[dict[str, Any]]:
    return [describe(catalog, catalog.pipelines[name]) for name in sorted(catalog.pipelines)]
