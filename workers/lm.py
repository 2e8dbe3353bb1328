"""Build DSPy LMs from settings, and choose the adapter that suits each model (workers/adapters.py).

LMs are built once per process per configuration and applied per task with `dspy.context`, so
thread and gevent pools are safe (dspy.configure may only be called by the thread that owns it).
"""

import os
import threading
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price-map fetch at import

import dspy

from contracts.specs import LMOverride
from workers.adapters import PlainFirstAdapter, SchemaJSONAdapter
from workers.settings import LOCAL_MODEL, LMSettings

_lms: dict[tuple[Any, ...], dspy.LM] = {}
_lock = threading.Lock()


def lm_for(settings: LMSettings, override: LMOverride | None = None) -> dspy.LM:
    """The process-wide LM for these settings, built on first use."""
    key = _lm_key(settings, override)
    with _lock:
        if key not in _lms:
            _lms[key] = _build_lm(settings, override)
        return _lms[key]


def _lm_key(settings: LMSettings, override: LMOverride | None) -> tuple[Any, ...]:
    extra = tuple(sorted((override.model_dump(exclude_none=True) if override else {}).items()))
    return (settings.model_dump_json(), extra)


def _build_lm(settings: LMSettings, override: LMOverride | None) -> dspy.LM:
    chosen = override.model_dump(exclude_none=True) if override else {}
    kwargs: dict[str, Any] = {
        "temperature": chosen.get("temperature", settings.temperature),
        "max_tokens": chosen.get("max_tokens", settings.max_tokens),
        "cache": settings.cache,
        "num_retries": 0,  # retries belong to Celery, with backoff and a record in the job
        "timeout": chosen.get("timeout", settings.timeout),
    }
    api_base = chosen.get("api_base") or settings.resolved_api_base
    if api_base:
        kwargs["api_base"] = api_base
        kwargs["api_key"] = settings.api_key
    if "rollout_id" in chosen:
        kwargs["rollout_id"] = chosen["rollout_id"]
    return dspy.LM(chosen.get("model", settings.model), **kwargs)


def adapter_for(settings: LMSettings) -> dspy.Adapter:
    """How stages put their signatures to this LM. The bundled SmolLM2 answers in plain words and
    gets the rest of the contract under the JSON schema (`PlainFirstAdapter`: the best of the ways
    measured by `bench/answers.py`, docs/benchmarks.md); any other model keeps the JSON adapters."""
    if settings.model == LOCAL_MODEL:
        return PlainFirstAdapter()
    return SchemaJSONAdapter() if settings.structured else dspy.JSONAdapter()
