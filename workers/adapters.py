"""How a stage's signature is put to the LM and its reply read back into the stage's contract.

`bench/answers.py` measures these (and DSPy's own adapters) on the bundled SmolLM2-135M; the figures
are in docs/benchmarks.md. What every adapter here shares: a reply cut at `max_tokens` or caught
repeating itself is an error naming the cause (`ReplyError`), never an answer. DSPy's JSON parsing
repairs a truncated object silently, which is how a looping field used to reach the job's state.

- `SchemaJSONAdapter`: the output fields as a JSON schema (`response_format`); llama.cpp, vLLM and
  OpenAI decode under it, so the reply always parses. Used for real providers (`structured`).
- `PlainTextAdapter`: the task in plain words, the reply read by the field's type (a text field
  takes the reply; a list its lines; a choice the option it names; a number the first number).
- `PlainFirstAdapter`: the local model's default. A signature whose first output field is text
  gets that field in plain words (small models answer far better without a JSON grammar), then the
  other fields from the schema-constrained adapter, with the plain answer among the inputs; any
  other signature goes to the schema-constrained adapter whole.
"""

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, get_args, get_origin

import dspy
from dspy.adapters.json_adapter import _get_structured_outputs_response_format
from dspy.adapters.utils import parse_value
from dspy.clients._deprecation import adapter_message_call
from dspy.utils.exceptions import AdapterParseError
from dspy.utils.usage_tracker import UsageTracker, track_usage

MAX_LIST_ITEMS = 5
MAX_STRING_CHARS = 600
REASONING = "reasoning"
LOOP_MIN_WORDS = 24  # shorter texts are not judged: a list of names can repeat words legitimately
LOOP_DISTINCT_RATIO = 0.5  # a text whose word 4-grams are mostly repeats is a model stuck in a loop


class ReplyError(ValueError):
    """The LM's reply cannot become the stage's outputs: cut short, looping, or not in the contract."""


# --- guards shared by every adapter ---------------------------------------------------------------


@contextmanager
def cut_replies_fail(lm: Any, lm_kwargs: dict[str, Any]) -> Iterator[UsageTracker]:
    """Raise `ReplyError` when a call made inside this block stopped at `max_tokens` (the server's
    finish_reason "length": completion tokens reached the limit). The usage rolls up to the caller's
    tracker as usual. A parse error of a cut reply is reported as the cut, its real cause."""
    limit = lm_kwargs.get("max_tokens") or getattr(lm, "kwargs", {}).get("max_tokens")
    with track_usage() as tracker:
        try:
            yield tracker
        except AdapterParseError as error:
            _raise_if_cut(tracker, limit, error)
            raise
    _raise_if_cut(tracker, limit, None)


def _raise_if_cut(tracker: UsageTracker, limit: int | None, cause: Exception | None) -> None:
    if not limit:
        return
    for entries in tracker.usage_data.values():
        if any(int(entry.get("completion_tokens") or 0) >= limit for entry in entries):
            raise ReplyError(
                f"the LM's reply was cut at max_tokens={limit} (finish_reason 'length'), so it is incomplete; "
                "raise STAGECOACH_LM_MAX_TOKENS (or the stage's `lm.max_tokens`) if the answer needs more"
            ) from cause


def looping(text: str) -> bool:
    """Whether a text mostly repeats itself (a small model at temperature 0 can cycle until a limit)."""
    words = text.lower().split()
    if len(words) < LOOP_MIN_WORDS:
        return False
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    return len(set(grams)) / len(grams) < LOOP_DISTINCT_RATIO


def refuse_loops(values: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The parsed replies with repeated list items dropped, unless a text (or a list item) loops."""
    for value in values:
        for name, field in value.items():
            if isinstance(field, list) and all(isinstance(item, str) for item in field):
                value[name] = field = distinct(field)
            for text in field if isinstance(field, list) else [field]:
                if isinstance(text, str) and looping(text):
                    raise ReplyError(f"the LM's reply for `{name}` repeats itself (the model is looping): "
                                     f"{text[:120]!r}...")
    return values


def distinct(items: list[str]) -> list[str]:
    """The items in order, each once (ignoring case and surrounding space): a small model often
    fills a list by repeating its first item."""
    seen: set[str] = set()
    kept = []
    for item in items:
        key = item.strip().lower()
        if key and key not in seen:
            seen.add(key)
            kept.append(item.strip())
    return kept


def complete_texts(lm: Any, messages: list[dict[str, Any]], lm_kwargs: dict[str, Any]) -> list[str]:
    """The texts of the LM's replies to `messages`; a reply cut at `max_tokens` raises `ReplyError`."""
    with cut_replies_fail(lm, lm_kwargs), adapter_message_call(lm, messages):
        outputs = lm(messages=messages, **lm_kwargs)
    texts = [output.get("text") if isinstance(output, dict) else output for output in outputs]
    return [text or "" for text in texts]


# --- schema-constrained JSON -------------------------------------------------------------------------


class SchemaJSONAdapter(dspy.JSONAdapter):
    """JSONAdapter that always sends the output fields as a JSON schema (`response_format`).

    llama.cpp, vLLM and OpenAI turn the schema into constrained decoding, so even a 135M model
    returns JSON that parses. Lists and strings get bounds so a looping model still terminates.
    The reply must be one complete JSON object: DSPy's repair of a cut-off object is not used.
    `describe` also writes each field's description into the prompt's requirements and the schema;
    `answer_first` moves a chain of thought's `reasoning` after the answer fields.
    """

    def __init__(self, describe: bool = False, answer_first: bool = False) -> None:
        super().__init__()
        self.describe = describe
        self.answer_first = answer_first

    def __call__(self, lm: Any, lm_kwargs: dict[str, Any], signature: Any, demos: list[dict[str, Any]],
                 inputs: dict[str, Any]) -> list[dict[str, Any]]:
        ordered = reasoning_last(signature) if self.answer_first else signature
        with cut_replies_fail(lm, lm_kwargs):
            values: list[dict[str, Any]] = super().__call__(lm, lm_kwargs, ordered, demos, inputs)
        return refuse_loops(values)

    def _prepare_response_format(self, lm: Any, lm_kwargs: dict[str, Any], signature: Any) -> None:
        model = _get_structured_outputs_response_format(signature, self.use_native_function_calling)
        schema = bounded_schema(model.model_json_schema())
        if self.describe:
            for name, prop in schema.get("properties", {}).items():
                if name in signature.output_fields and field_desc(signature.output_fields[name]):
                    prop["description"] = field_desc(signature.output_fields[name])
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
        if self.describe:
            described = "; ".join(f"`{name}`: {field_desc(field) or type_words(field.annotation)}"
                                  for name, field in signature.output_fields.items())
            return f"Respond with one JSON object with the fields {described}."
        names = ", ".join(f"`{name}`" for name in signature.output_fields)
        return f"Respond with one JSON object with the fields {names}."

    def parse(self, signature: Any, completion: str) -> dict[str, Any]:
        try:
            json.loads(completion)
        except json.JSONDecodeError as error:
            raise AdapterParseError(
                adapter_name=type(self).__name__, signature=signature, lm_response=completion,
                message=f"the reply is not one complete JSON object ({error}); a reply cut short is not repaired",
            ) from None
        parsed: dict[str, Any] = super().parse(signature, completion)
        return parsed


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


def reasoning_last(signature: Any) -> Any:
    """The signature with a chain of thought's `reasoning` output moved after the other outputs."""
    if REASONING not in signature.output_fields or len(signature.output_fields) == 1:
        return signature
    field = signature.output_fields[REASONING]
    return signature.delete(REASONING).append(REASONING, field, type_=field.annotation)


def field_desc(field: Any) -> str:
    """A field's own description (DSPy fills a missing one with `${name}`, which says nothing)."""
    desc = str((field.json_schema_extra or {}).get("desc") or "")
    return "" if desc.startswith("${") else desc


def type_words(annotation: Any) -> str:
    if annotation is str:
        return "text"
    if _is_list(annotation):
        return "a list"
    if _choices(annotation):
        return "one of " + ", ".join(_choices(annotation))
    return getattr(annotation, "__name__", str(annotation))


# --- plain text ---------------------------------------------------------------------------------------


class PlainTextAdapter(dspy.Adapter):
    """The task in plain words, no markup; the reply read into the contract by each field's type.

    One output field takes the whole reply. Several are asked for as `Name: value` lines (small
    models rarely keep to that: see the benchmark). Demos become user/assistant turns.
    """

    def __call__(self, lm: Any, lm_kwargs: dict[str, Any], signature: Any, demos: list[dict[str, Any]],
                 inputs: dict[str, Any]) -> list[dict[str, Any]]:
        texts = complete_texts(lm, self.format(signature, demos, inputs), lm_kwargs)
        return refuse_loops([self.parse(signature, text) for text in texts])

    def format(self, signature: Any, demos: list[dict[str, Any]], inputs: dict[str, Any]) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = [{"role": "system", "content": plain_task(signature)}]
        for demo in demos:
            if all(name in demo for name in signature.output_fields):
                messages.append({"role": "user", "content": plain_inputs(signature, demo)})
                messages.append({"role": "assistant", "content": plain_outputs(signature, demo)})
        messages.append({"role": "user", "content": plain_inputs(signature, inputs)})
        return messages

    def parse(self, signature: Any, completion: str) -> dict[str, Any]:
        fields = signature.output_fields
        texts = {name: completion for name in fields} if len(fields) == 1 else labelled(fields, completion)
        missing = [name for name in fields if name not in texts]
        if missing:
            raise AdapterParseError(adapter_name=type(self).__name__, signature=signature, lm_response=completion,
                                    message=f"no line for {', '.join(missing)} in the reply")
        try:
            return {name: read_plain(fields[name].annotation, texts[name], name) for name in fields}
        except ValueError as error:
            raise AdapterParseError(adapter_name=type(self).__name__, signature=signature, lm_response=completion,
                                    message=str(error)) from None


def plain_task(signature: Any) -> str:
    """The signature's instructions, then what each output must be, in words."""
    lines = [signature.instructions.strip()]
    fields = signature.output_fields
    if len(fields) == 1:
        name, field = next(iter(fields.items()))
        lines.append(_reply_rule(name, field, single=True))
    else:
        lines.append("Reply with one line per item, in this order:")
        lines += [f"{words(name).capitalize()}: {field_desc(field) or type_words(field.annotation)}"
                  for name, field in fields.items()]
    return "\n".join(line for line in lines if line)


def _reply_rule(name: str, field: Any, single: bool) -> str:
    desc = field_desc(field)
    annotation = field.annotation
    if _is_list(annotation):
        return f"Reply with the {words(name)} ({desc or 'a list'}), one per line, and nothing else."
    if _choices(annotation):
        return f"Reply with one of: {', '.join(_choices(annotation))}."
    if annotation in (float, int):
        return f"Reply with the {words(name)} as a number{f' ({desc})' if desc else ''}."
    return f"Reply with the {words(name)} only{f' ({desc})' if desc else ''}."


def plain_inputs(signature: Any, values: dict[str, Any]) -> str:
    """The inputs as plain text: a lone input as it is, several as `Name: value` paragraphs; empty
    inputs are left out (an empty persona says nothing)."""
    given = {name: values.get(name) for name in signature.input_fields if values.get(name) not in (None, "", [])}
    if len(given) == 1:
        return _plain_value(next(iter(given.values())))
    return "\n\n".join(f"{words(name).capitalize()}: {_plain_value(value)}" for name, value in given.items())


def plain_outputs(signature: Any, values: dict[str, Any]) -> str:
    fields = signature.output_fields
    if len(fields) == 1:
        return _plain_value(values[next(iter(fields))], lines=True)
    return "\n".join(f"{words(name).capitalize()}: {_plain_value(values[name])}" for name in fields)


def _plain_value(value: Any, lines: bool = False) -> str:
    if isinstance(value, list):
        items = [str(v) for v in value]
        long = lines or any(len(item) > 60 for item in items)
        return "\n".join(f"- {item}" for item in items) if long else ", ".join(items)
    return str(value)


def words(name: str) -> str:
    return name.replace("_", " ")


def labelled(fields: dict[str, Any], completion: str) -> dict[str, str]:
    """`Name: value` lines of a reply, keyed by field name (case and `_`/space insensitive)."""
    wanted = {words(name).lower(): name for name in fields}
    found: dict[str, str] = {}
    for line in completion.splitlines():
        label, sep, rest = line.partition(":")
        name = wanted.get(label.strip().strip("*#- ").lower())
        if sep and name and name not in found:
            found[name] = rest.strip().lstrip("*").strip()  # `**Answer:** Paris`
    return found


BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def read_plain(annotation: Any, text: str, name: str) -> Any:
    """One field's value from plain text, by its type; ValueError when the text does not give one."""
    text = text.strip()
    if annotation is str:
        return _clean_text(text, name)
    if _is_list(annotation):
        items = _list_items(text)
        if not items:
            raise ValueError(f"no items for `{name}` in the reply")
        return items[:MAX_LIST_ITEMS]
    if _choices(annotation):
        return _choice(_choices(annotation), text, name)
    if annotation in (float, int):
        match = NUMBER.search(text)
        if match is None:
            raise ValueError(f"no number for `{name}` in the reply")
        return annotation(float(match.group()))
    return parse_value(text, annotation)


def _clean_text(text: str, name: str) -> str:
    """The reply without a leading `Answer:` style label or wrapping quotes."""
    label, sep, rest = text.partition(":")
    if sep and label.strip().lower() == words(name).lower():
        text = rest.strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    if not text:
        raise ValueError(f"empty reply for `{name}`")
    return text


def _list_items(text: str) -> list[str]:
    lines = [BULLET.sub("", line).strip() for line in text.splitlines() if line.strip()]
    if len(lines) == 1 and "," in lines[0]:
        lines = [part.strip() for part in lines[0].split(",")]
    return [line.rstrip(".") for line in lines if line]


def _choice(options: list[str], text: str, name: str) -> str:
    """The option the text names first (`multiple_choice` also matches `multiple choice`)."""
    lowered = text.lower()
    positions = {}
    for option in options:
        hits = [lowered.find(form) for form in {option.lower(), words(option).lower()} if form in lowered]
        if hits:
            positions[option] = min(hits)
    if not positions:
        raise ValueError(f"the reply names none of {', '.join(options)} for `{name}`")
    return min(positions, key=lambda option: positions[option])


def _is_list(annotation: Any) -> bool:
    return get_origin(annotation) is list


def _choices(annotation: Any) -> list[str]:
    if get_origin(annotation) is Literal:
        return [str(arg) for arg in get_args(annotation)]
    return []


# --- plain answer first, the rest constrained ----------------------------------------------------------


class PlainFirstAdapter(dspy.Adapter):
    """The first output field in plain words when it is text; the other fields from the schema adapter.

    `Answer(question -> answer, confidence)`: the answer is asked plainly, then `confidence` is
    decoded under the JSON schema with the answer among the inputs. A chain of thought's reasoning
    is its first text field, so the model thinks in plain words and the schema pulls the answer out.
    A signature whose first output is a list or a choice goes to the schema adapter in one call.
    """

    may_call_twice = True  # so a stage's time limit is kept by a deadline thread (workers/stage.py)

    def __init__(self) -> None:
        super().__init__()
        self.plain = PlainTextAdapter()
        self.schema = SchemaJSONAdapter()

    def __call__(self, lm: Any, lm_kwargs: dict[str, Any], signature: Any, demos: list[dict[str, Any]],
                 inputs: dict[str, Any]) -> list[dict[str, Any]]:
        first, field = next(iter(signature.output_fields.items()))
        if field.annotation is not str:
            return self.schema(lm, dict(lm_kwargs), signature, demos, inputs)
        head = only_outputs(signature, [first])
        answered = self.plain(lm, dict(lm_kwargs), head, demos, inputs)[0]
        if len(signature.output_fields) == 1:
            return [answered]
        rest = signature.delete(first).append(first, dspy.InputField(desc=field_desc(field)), type_=str)
        extracted = self.schema(lm, dict(lm_kwargs), rest, demos, {**inputs, first: answered[first]})[0]
        return [{**answered, **extracted}]


def only_outputs(signature: Any, keep: list[str]) -> Any:
    """The signature with only these output fields."""
    for name in list(signature.output_fields):
        if name not in keep:
            signature = signature.delete(name)
    return signature

