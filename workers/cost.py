"""Token usage of a DSPy call, with a cost estimate from litellm's LOCAL price map (never fetched).

The map is the JSON file the litellm package ships (`model_prices_and_context_window_backup.json`),
read directly: importing litellm costs ~5 s of CPU, which a stage's first call cannot afford under
a tight time limit (DSPy's OpenAI-compatible calls do not import it). A model the map does not
know gets no cost: it is named in `Usage.unpriced` instead of being counted as free.
"""

import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from contracts.envelope import Usage

PRICE_MAP_FILE = "model_prices_and_context_window_backup.json"


@lru_cache(maxsize=1)
def price_map() -> dict[str, dict[str, Any]]:
    """litellm's bundled price map: model name -> prices per token (empty if litellm is absent)."""
    spec = importlib.util.find_spec("litellm")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / PRICE_MAP_FILE
        if path.is_file():
            data: dict[str, dict[str, Any]] = json.loads(path.read_text())
            return data
    return {}


def price(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """US dollars for these tokens, or None when the local price map does not know the model."""
    prices = price_map()
    entry = prices.get(model) or prices.get(model.split("/", 1)[-1])  # `openai/gpt-4o-mini` or `gpt-4o-mini`
    if not entry:
        return None
    per_prompt, per_completion = entry.get("input_cost_per_token"), entry.get("output_cost_per_token")
    if per_prompt is None or per_completion is None:
        return None
    return prompt_tokens * float(per_prompt) + completion_tokens * float(per_completion)


def usage_of(calls_by_model: dict[str, list[dict[str, Any]]]) -> Usage:
    """Usage of the LM calls DSPy's usage tracker recorded (model -> one entry per call; DSPy's own cache
    hits record none), priced: a module that calls the LM three times counts three calls."""
    total = Usage()
    for model, entries in calls_by_model.items():
        prompt = sum(int(e.get("prompt_tokens") or 0) for e in entries)
        completion = sum(int(e.get("completion_tokens") or 0) for e in entries)
        total = total.plus(model_usage(model, prompt, completion, len(entries)))
    return total


def model_usage(model: str, prompt_tokens: int, completion_tokens: int, calls: int = 1) -> Usage:
    cost = price(model, prompt_tokens, completion_tokens)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, calls=calls,
                 cost_usd=cost, unpriced=[] if cost is not None else [model])
