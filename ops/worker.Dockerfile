# A CPU lorafleet worker with the bundled demo model and adapters, for docker-compose.yml.
# Build context: the repository root (`docker compose -f ops/docker-compose.yml build`).
# On a GPU host, start from a CUDA base image and install the CUDA build of torch instead.
FROM python:3.11-slim

WORKDIR /app
# The CPU wheel of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch
COPY pyproject.toml README.md ./
COPY producer producer
COPY worker worker
COPY kernels kernels
RUN pip install --no-cache-dir '.[worker]'

ENV LORAFLEET_MODEL=/app/worker/demo/assets/demo/base \
    LORAFLEET_ADAPTER_ROOTS=/app/worker/demo/assets/demo/adapters \
    LORAFLEET_DEVICE=cpu \
    LORAFLEET_METRICS_PORT=9400
EXPOSE 9400
CMD ["lorafleet", "worker"]
