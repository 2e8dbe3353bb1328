"""Token usage of a DSPy call, with a cost estimate from litellm's LOCAL price map (never fetched).

A model the map does not know gets no cost: it is named in `Usage.unpriced` instead of being
counted as free.
"""

import os
from typing import Any

from contracts.envelope import Usage

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before litellm is imported: no fetch


def price(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """US dollars for these tokens, or None when the local price map does not know the model."""
    import litellm  # ~5 s of CPU: paid by the first priced call, not by every worker's start-up

    try:
        prompt_cost, completion_cost = litellm.cost_per_token(
            model=model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )
    except Exception:  # litellm raises several types (NotFoundError, ModelNotMappedError...) for "unknown"
        return None
    return float(prompt_cost) + float(completion_cost)


def usage_of(prediction: Any) -> Usage:
    """Usage DSPy tracked for a prediction (`get_lm_usage()`: model -> token counts), priced."""
    getter = getattr(prediction, "get_lm_usage", None)
    raw: dict[str, dict[str, Any]] = (getter() if getter else None) or {}
    total = Usage()
    for model, entry in raw.items():
        total = total.plus(model_usage(model, int(entry.get("prompt_tokens") or 0),
                                       int(entry.get("completion_tokens") or 0)))
    return total


def model_usage(model: str, prompt_tokens: int, completion_tokens: int) -> Usage:
    cost = price(model, prompt_tokens, completion_tokens)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, calls=1,
                 cost_usd=cost, unpriced=[] if cost is not None else [model])
