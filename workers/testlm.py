"""A deterministic OpenAI-compatible LM server for tests, demos without a model, and benchmarks.

Replies are derived from the prompt alone (never from call order), so a fleet of workers and an
in-process DSPy program get identical answers. It answers `response_format` JSON schemas with
values built from the input fields (`answer of <question text>`), so data flow is visible.

Fault injection, server-wide or per prompt (markers anywhere in an input):
  --latency-ms N / [[lm:sleep=N]]      add latency
  --fail-rate P                        deterministic 503s for a fraction of (prompt, attempt)
  --fail-statuses 429:0.3,500:0.2      deterministic statuses for fractions of (prompt, attempt)
  [[lm:fail_first=N]]                  the first N attempts of this prompt get 503
  [[lm:fail]] / [[lm:status=400]]      always 503 / always this status
  [[lm:garbage]]                       reply with text that is not JSON
  [[lm:set:FIELD=VALUE]]               reply VALUE (JSON, else text) for output FIELD
  --vary                               text values also depend on the instructions, the demos and the
                                       temperature (a ` ~xxxx` suffix): candidate programs differ
Rules (`--rules FILE`, JSON list of {"when": regex, "set": {field: value}}) pin chosen fields.
`GET /stats` reports request counts.

Run: python -m workers.testlm --port 8091 [--latency-ms 50]
"""

import argparse
import contextlib
import hashlib
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SECTION = re.compile(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?=\n\n\[\[ ## |\n\nRespond with|\Z)", re.S)
MARKER = re.compile(r"\[\[lm:(\w+)(?:=([^\]]*))?\]\]")
SET_MARKER = re.compile(r"\[\[lm:set:(\w+)=([^\]]*)\]\]")
JSON_FIELDS = re.compile(r"Respond with a JSON object in the following order of fields: (.*)")


class Behaviour:
    """Server-wide settings and the counters fault injection needs."""

    def __init__(self, latency_ms: float = 0, fail_rate: float = 0, rules: list[dict[str, Any]] | None = None,
                 fail_statuses: dict[int, float] | None = None, vary: bool = False):
        self.fail_statuses = fail_statuses or {}
        self.vary = vary
        self.latency_ms = latency_ms
        self.fail_rate = fail_rate
        self.rules = [(re.compile(r["when"], re.S | re.I), r["set"]) for r in rules or []]
        self.attempts: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def attempt(self, prompt_key: str) -> int:
        with self.lock:
            self.attempts[prompt_key] += 1
            return self.attempts[prompt_key]

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1


def digest(*parts: str) -> int:
    return int(hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:12], 16)


def parse_inputs(messages: list[dict[str, Any]]) -> dict[str, str]:
    """The input fields of the last user message, as DSPy's adapters format them."""
    user = [m for m in messages if m.get("role") == "user"]
    text = _text(user[-1]) if user else ""
    return {name: value.strip() for name, value in SECTION.findall(text)}


def _text(message: dict[str, Any]) -> str:
    content = message.get("content", "")
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Generator:
    """Fill a JSON schema with values derived from the prompt's inputs."""

    def __init__(self, inputs: dict[str, str], seed: str, suffix: str = "") -> None:
        self.inputs = inputs
        self.seed = seed
        self.suffix = suffix
        self.subject = _short(next(iter(inputs.values()), "nothing"))
        self.haystack = " ".join(inputs.values()).lower()

    def value(self, name: str, schema: dict[str, Any], defs: dict[str, Any]) -> Any:
        if "$ref" in schema:
            return self.value(name, defs[schema["$ref"].split("/")[-1]], defs)
        if "anyOf" in schema:
            options = [s for s in schema["anyOf"] if s.get("type") != "null"]
            return self.value(name, options[0] if options else {"type": "null"}, defs)
        if "enum" in schema:
            return self._choice(name, list(schema["enum"]))
        kind = schema.get("type", "string")
        maker = getattr(self, f"_{kind}", self._string)
        return maker(name, schema, defs)

    def _choice(self, name: str, options: list[Any]) -> Any:
        for option in options:
            if str(option).lower().replace("_", " ") in self.haystack or str(option).lower() in self.haystack:
                return option
        return options[digest(self.seed, name) % len(options)]

    def _string(self, name: str, schema: dict[str, Any], defs: dict[str, Any]) -> str:
        text = f"{name} of <{self.subject}>{self.suffix}"
        return text[: schema.get("maxLength", len(text))]

    def _number(self, name: str, schema: dict[str, Any], defs: dict[str, Any]) -> float:
        low, high = schema.get("minimum", 0.0), schema.get("maximum", 1.0)
        return round(float(low + (high - low) * (digest(self.seed, name) % 1000) / 1000), 3)

    def _integer(self, name: str, schema: dict[str, Any], defs: dict[str, Any]) -> int:
        low, high = int(schema.get("minimum", 0)), int(schema.get("maximum", 9))
        return low + digest(self.seed, name) % (high - low + 1)

    def _boolean(self, name: str, schema: dict[str, Any], defs: dict[str, Any]) -> bool:
        return digest(self.seed, name) % 2 == 0

    def _null(self, name: str, schema: dict[str, Any], defs: dict[str, Any]) -> None:
        return None

    def _array(self, name: str, schema: dict[str, Any], defs: dict[str, Any]) -> list[Any]:
        count = max(schema.get("minItems", 1), min(2, schema.get("maxItems", 2)))
        item = schema.get("items", {"type": "string"})
        return [self._item(name, i, item, defs) for i in range(count)]

    def _item(self, name: str, index: int, schema: dict[str, Any], defs: dict[str, Any]) -> Any:
        value = self.value(f"{name}[{index}]", schema, defs)
        return f"{name} {index + 1} of <{self.subject}>{self.suffix}" if isinstance(value, str) else value

    def _object(self, name: str, schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
        props = schema.get("properties", {})
        return {key: self.value(key, sub, defs) for key, sub in props.items()}


def reply_fields(body: dict[str, Any], behaviour: Behaviour) -> dict[str, Any]:
    messages = body.get("messages", [])
    inputs = parse_inputs(messages)
    seed = json.dumps(inputs, sort_keys=True)
    schema = _schema_of(body)
    suffix = context_suffix(body) if behaviour.vary else ""
    fields = Generator(inputs, seed, suffix).value("outputs", schema, schema.get("$defs", {}))
    prompt = " ".join(_text(m) for m in messages)
    for pattern, values in behaviour.rules:
        if pattern.search(" ".join(inputs.values()) or prompt):
            fields.update({k: v for k, v in values.items() if k in fields})
    if isinstance(fields, dict):
        fields.update(pinned_fields(" ".join(inputs.values()), fields))
    return fields if isinstance(fields, dict) else {"value": fields}


def context_suffix(body: dict[str, Any]) -> str:
    """` ~xxxx` from everything before the last message (instructions, demos) and the temperature; from
    the whole prompt when it has no input sections (a raw prompt, like GEPA's reflection)."""
    messages = body.get("messages", [])
    context = messages if not parse_inputs(messages) else messages[:-1]
    return f" ~{digest(json.dumps([context, body.get('temperature')], sort_keys=True)) % 65536:04x}"


def pinned_fields(text: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Output fields pinned by `[[lm:set:FIELD=VALUE]]` markers in the inputs (only known fields)."""
    pinned: dict[str, Any] = {}
    for name, raw in SET_MARKER.findall(text):
        if name in fields:
            try:
                pinned[name] = json.loads(raw)
            except json.JSONDecodeError:
                pinned[name] = raw.strip()
    return pinned


def _schema_of(body: dict[str, Any]) -> dict[str, Any]:
    """The reply's JSON schema: the request's `response_format`, else the fields DSPy's JSON adapter asks
    for in the prompt (as text), else `{answer}`."""
    fmt = body.get("response_format") or {}
    schema = (fmt.get("json_schema") or {}).get("schema") or fmt.get("schema")
    return schema or _asked_fields(body) or {"type": "object", "properties": {"answer": {"type": "string"}}}


def _asked_fields(body: dict[str, Any]) -> dict[str, Any] | None:
    user = [m for m in body.get("messages", []) if m.get("role") == "user"]
    found = JSON_FIELDS.search(_text(user[-1])) if user else None
    if found is None:
        return None
    names = re.findall(r"`(\w+)`", found.group(1))
    return {"type": "object", "properties": {name: {"type": "string"} for name in names}} if names else None


class Handler(BaseHTTPRequestHandler):
    behaviour: Behaviour
    protocol_version = "HTTP/1.1"
    # headers and body go out in two writes; with Nagle on, back-to-back calls on a kept-alive
    # connection wait ~40 ms for the client's delayed ACK (measured: 55 ms a call instead of 10)
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default
        return

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": "test-lm", "object": "model"}]})
        elif self.path.startswith("/stats"):
            self._send(200, {"counts": dict(self.behaviour.counts)})
        elif self.path.startswith("/health"):
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            self._send(400, {"error": {"message": "request body is not JSON"}})
            return
        self.behaviour.count("requests")
        self._complete(body)

    def _complete(self, body: dict[str, Any]) -> None:
        inputs_text = " ".join(parse_inputs(body.get("messages", [])).values())
        markers = dict(MARKER.findall(inputs_text))
        key = hashlib.sha256(json.dumps(body.get("messages", []), sort_keys=True).encode()).hexdigest()
        attempt = self.behaviour.attempt(key)
        time.sleep((self.behaviour.latency_ms + float(markers.get("sleep") or 0)) / 1000)
        status = self._injected_status(markers, key, attempt)
        if status is not None:
            self.behaviour.count(f"status_{status}")
            self._send(status, {"error": {"message": f"injected failure (attempt {attempt})", "code": status}})
            return
        content = "this is not json" if "garbage" in markers else json.dumps(reply_fields(body, self.behaviour))
        self.behaviour.count("completions")
        self._send(200, _completion(body, content))

    def _injected_status(self, markers: dict[str, str], key: str, attempt: int) -> int | None:
        if "status" in markers:
            return int(markers["status"])
        if "fail" in markers:
            return 503
        if "fail_first" in markers and attempt <= int(markers["fail_first"]):
            return 503
        draw = (digest(key, str(attempt)) % 10_000) / 10_000
        if self.behaviour.fail_rate and draw < self.behaviour.fail_rate:
            return 503
        for status, share in self.behaviour.fail_statuses.items():  # consecutive slices of [0, 1)
            if draw < share:
                return status
            draw -= share
        return None

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _completion(body: dict[str, Any], content: str) -> dict[str, Any]:
    prompt_chars = sum(len(_text(m)) for m in body.get("messages", []))
    prompt_tokens, completion_tokens = prompt_chars // 4 + 1, len(content) // 4 + 1
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "test-lm"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def make_server(host: str, port: int, behaviour: Behaviour) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"behaviour": behaviour})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve_in_thread(port: int = 0, **options: Any) -> tuple[ThreadingHTTPServer, str]:
    """Start a server on a background thread; returns it and its OpenAI base URL."""
    server = make_server("127.0.0.1", port, Behaviour(**options))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def parse_statuses(text: str) -> dict[int, float]:
    """`429:0.3,500:0.2` -> {429: 0.3, 500: 0.2}."""
    pairs = (item.split(":") for item in text.split(",") if item.strip())
    return {int(status): float(share) for status, share in pairs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--fail-statuses", type=parse_statuses, default={},
                        help="STATUS:SHARE,... e.g. 429:0.3,500:0.2")
    parser.add_argument("--rules", type=Path)
    parser.add_argument("--vary", action="store_true", help="text values depend on instructions, demos, temperature")
    args = parser.parse_args(argv)
    rules = json.loads(args.rules.read_text()) if args.rules else None
    server = make_server(args.host, args.port,
                         Behaviour(args.latency_ms, args.fail_rate, rules, args.fail_statuses, args.vary))
    print(f"test LM listening on http://{args.host}:{server.server_address[1]}/v1", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
