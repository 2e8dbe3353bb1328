"""The settings table (README and `stagecoach settings`), generated from workers.settings so it stays true."""

import json
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from api.settings import APISettings
from contracts.connections import SentinelSettings
from workers.settings import PROJECT_ROOT, CacheSettings, LMSettings, Settings, WebhookSettings

Row = tuple[str, str, str, str]


def rows() -> list[Row]:
    return (_rows(Settings, "STAGECOACH_", skip={"lm", "cache", "webhook", "sentinel"})
            + _rows(LMSettings, "STAGECOACH_LM_") + _rows(CacheSettings, "STAGECOACH_CACHE_")
            + _rows(SentinelSettings, "STAGECOACH_SENTINEL_") + _rows(APISettings, "STAGECOACH_API_")
            + _rows(WebhookSettings, "STAGECOACH_WEBHOOK_"))


def monitor_rows() -> list[Row]:
    """The monitor's own settings (docs/monitor.md); it shares the broker and catalog settings above."""
    from monitor.settings import MonitorSettings

    return _rows(MonitorSettings, "STAGECOACH_MONITOR_", skip={"broker_url", "catalog", "sentinel", "admin_token"})


def _rows(model: type[BaseModel], prefix: str, skip: frozenset[str] | set[str] = frozenset()) -> list[Row]:
    found = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        default = info.default_factory() if info.default_factory else info.default  # type: ignore[call-arg]
        found.append((prefix + name.upper(), _type_name(info.annotation), _show(default), info.description or ""))
    return found


def _type_name(annotation: Any) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return text.replace("pathlib.", "").replace("typing.", "").replace("pydantic.types.", "").replace(" | ", " or ")


def _show(value: Any) -> str:
    if value is None or value is PydanticUndefined:
        return "-"
    if isinstance(value, list):
        value = [str(v).replace(str(PROJECT_ROOT), ".") for v in value]
        return json.dumps(value)
    return str(value)


def effective() -> list[tuple[str, str, str]]:
    """Values derived from the settings and the catalog, e.g. the Redis visibility timeout."""
    from contracts.catalog import load_catalog
    from workers.factory import visibility_timeout

    settings = Settings()
    seconds = visibility_timeout(settings, load_catalog(settings.catalog))
    source = ("STAGECOACH_VISIBILITY_TIMEOUT" if settings.visibility_timeout is not None
              else "longest stage hard limit (its limit + a tenth, 2-30 s) + 60 s")
    return [("effective visibility timeout", f"{seconds} s", source)]


def markdown() -> str:
    lines = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{env}` | {kind} | `{default}` | {meaning} |" for env, kind, default, meaning in rows()]
    return "\n".join(lines)
