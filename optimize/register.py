"""Ship the winner beside the old: each optimised stage's state saved (DSPy's JSON, `module.save`), new
stage versions that name it (`pinned_only`: unpinned references keep the old ones), and a new pipeline
version pinning them, written as one catalog file. The old version stays as it was; the new one's
`traffic` split says which share of unpinned jobs it gets (0 by default: pin it, `qa@2`, or raise the share).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspy
import yaml

from contracts.catalog import (
    STATES_FOLDER,
    Catalog,
    check_catalog,
    iter_nodes,
    load_catalog,
    pin_versions,
    versions_of,
)
from contracts.specs import PipelineSpec, StageNode, StageSpec


@dataclass(frozen=True)
class Registered:
    pipeline: str
    version: str
    base_version: str
    file: Path
    states: dict[str, Path]  # stage name -> saved state
    stage_versions: dict[str, str]  # stage name -> new version


def next_version(versions: list[str]) -> str:
    """One past the highest numeric version (`1`, `2` -> `3`); `2` when none is numeric."""
    numbers = [int(v) for v in versions if v.isdigit()]
    return str(max(numbers, default=1) + 1)


def register(catalog: Catalog, catalog_paths: list[Path], base: PipelineSpec, stages: dict[str, dspy.Module],
             out_dir: Path, share: int = 0) -> Registered:
    """Write `<out_dir>/<pipeline>-v<N>.yaml` and its state files; check the catalog loads with it."""
    version = next_version(versions_of(catalog.pipelines, base.name))
    folder = out_dir / STATES_FOLDER / f"{base.name}-v{version}"  # not read as specs (contracts/catalog.py)
    folder.mkdir(parents=True, exist_ok=True)
    pinned = pin_versions(catalog, base)
    new_stages: list[dict[str, Any]] = []
    states: dict[str, Path] = {}
    stage_versions: dict[str, str] = {}
    for name, module in stages.items():
        current = _stage_of(catalog, pinned, name)
        stage_versions[name] = next_version(versions_of(catalog.stages, name))
        states[name] = _save_state(module, folder / f"{name}.json")
        new_stages.append(_stage_entry(current, stage_versions[name], f"{STATES_FOLDER}/{folder.name}/{name}.json"))
    root = _repin(pinned.root.model_dump(mode="json", exclude_none=True), stage_versions)
    spec = {**base.model_dump(mode="json", exclude_none=True), "version": version, "root": root,
            "description": f"{base.description} (optimised from version {base.version})".strip(),
            "traffic": {base.version: 100 - share, version: share}}
    file = out_dir / f"{base.name}-v{version}.yaml"
    file.write_text(_header(base, version) + yaml.safe_dump({"stages": new_stages, "pipeline": spec}, sort_keys=False))
    check_catalog(load_catalog([*catalog_paths, file] if not _inside(file, catalog_paths) else catalog_paths))
    return Registered(base.name, version, base.version, file, states, stage_versions)


def _stage_of(catalog: Catalog, pinned: PipelineSpec, name: str) -> StageSpec:
    for node in iter_nodes(pinned.root):
        if isinstance(node, StageNode) and catalog.stage(node.stage, node.version).name == name:
            return catalog.stage(node.stage, node.version)
    raise ValueError(f"stage '{name}' is not in pipeline '{pinned.name}'")


def _save_state(module: dspy.Module, path: Path) -> Path:
    """DSPy's JSON (`module.save`), predictors' own LMs dropped: the stage's LM comes from the worker."""
    copy = module.deepcopy()
    for _, predictor in copy.named_predictors():
        predictor.lm = None
    copy.save(str(path))
    return path


def _stage_entry(current: StageSpec, version: str, state: str) -> dict[str, Any]:
    entry = current.model_dump(mode="json", exclude_none=True, exclude={"state_digest"})
    entry.update({"version": version, "state": state, "pinned_only": True,
                  "description": f"{current.description} (optimised from version {current.version})".strip()})
    return entry


def _repin(node: Any, versions: dict[str, str]) -> Any:
    """The node tree with every stage node of an optimised stage pinned to its new version."""
    if isinstance(node, list):
        return [_repin(item, versions) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get("kind") == "stage" and node.get("stage", "").split("@")[0] in versions:
        name = node["stage"].split("@")[0]
        return {**node, "stage": name, "version": versions[name]}
    return {key: _repin(value, versions) for key, value in node.items()}


def _inside(file: Path, paths: list[Path]) -> bool:
    resolved = file.resolve()
    return any(p.is_dir() and resolved.is_relative_to(p.resolve()) for p in paths)


def _header(base: PipelineSpec, version: str) -> str:
    return (f"# Written by `stagecoach optimize`: version {version} of pipeline '{base.name}', optimised from "
            f"version {base.version}.\n# Its stage versions are pinned_only (the old version keeps its stages); "
            f"`traffic` gives the share of unpinned jobs per version.\n")
