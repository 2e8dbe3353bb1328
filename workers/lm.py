"""Build DSPy LMs from settings and the adapter that makes small models parse reliably.

LMs are built once per process per configuration and applied per task with `dspy.context`, so
thread and gevent pools are safe (dspy.configure may only be called by the thread that owns it).
"""

import os
import threading
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price-map fetch at import

import dspy
from dspy.adapters.json_adapter import _get_structured_outputs_response_format

from contracts.specs import LMOverride
from workers.settings import LMSettings

MAX_LIST_ITEMS = 5
MAX_STRING_CHARS = 600

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
    return SchemaJSONAdapter() if settings.structured else dspy.JSONAdapter()


class SchemaJSONAdapter(dspy.JSONAdapter):
    """JSONAdapter that always sends the output fields as a JSON schema (`response_format`).

    llama.cpp, vLLM and OpenAI turn the schema into constrained decoding, so even a 135M model
    returns JSON that parses. Lists and strings get bounds so a looping model still terminates.
    """

    def _prepare_response_format(self, lm: Any, lm_kwargs: dict[str, Any], signature: Any) -> None:
        model = _get_structured_outputs_response_format(signature, self.use_native_function_calling)
        schema = bounded_schema(model.model_json_schema())
        lm_kwargs["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "outputs", "strict": True, "schema": schema},
        }

    # The schema already fixes the reply's shape; showing small models a template with `{answer}`
    # placeholders makes them copy the placeholders, so the prompt only names the fields.
    def format_field_structure(self, signature: Any) -> str:
        return (
            "The inputs follow, each under a [[ ## name ## ]] header. Reply with one JSON object holding "
            "the output fields, each filled with real content (never a placeholder)."
        )

    def user_message_output_requirements(self, signature: Any) -> str:
        names = ", ".join(f"`{name}`" for name in signature.output_fields)
        return f"Respond with one JSON object with the fields {names}."


def bounded_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Copy of a JSON schema with maxItems on arrays and maxLength on strings where none is set."""
    out = {k: _bound(v) for k, v in schema.items()}
    if out.get("type") == "array":
        out.setdefault("maxItems", MAX_LIST_ITEMS)
        out.setdefault("minItems", 1)
    if out.get("type") == "string" and "enum" not in out:
        out.setdefault("maxLength", MAX_STRING_CHARS)
    return out


def _bound(value: Any) -> Any:
    if isinstance(value, dict):
        return bounded_schema(value)
    if isinstance(value, list):
        return [_bound(v) for v in value]
    return value
