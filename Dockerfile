# imagefm serve on the CPU: embeddings, zero-shot, search, and chat (a VLM or a language model,
# continuous batching), behind the OpenAI-shaped API.
#
#   docker build -t imagefm .
#   docker run --rm -p 8000:8000 -v "$PWD/models/my-clip:/models/model:ro" imagefm
#   docker run --rm -p 8000:8000 -v hf-cache:/home/imagefm/.cache/huggingface \
#       imagefm --model openai/clip-vit-base-patch32          # a hub id (cached in the volume)
#
# docs/deploy.md has the compose example. The image runs as the non-root user `imagefm`.

# Where the registry or PyTorch's index cannot be reached, a mirror stands in (docs/deploy.md):
#   --build-arg BASE_IMAGE=...   any Debian-based image with python (3.10+) and its venv module
#   --build-arg TORCH_PIP_ARGS="--find-links http://HOST/wheels" --build-arg TORCH_SPEC=torch==X+cpu
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# PyTorch's CPU-only wheels: the default index's wheels carry CUDA (several GB).
ARG TORCH_SPEC="torch==2.14.1"
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
RUN python -m venv /opt/imagefm \
 && /opt/imagefm/bin/pip install $TORCH_PIP_ARGS "$TORCH_SPEC"
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN /opt/imagefm/bin/pip install ".[serve,lm]"

FROM ${BASE_IMAGE}
# gcc: imagefm builds its quantised-decode kernel on first use (models/quantized.py).
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 imagefm
COPY --from=build /opt/imagefm /opt/imagefm
ENV PATH=/opt/imagefm/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=2 \
    HF_HOME=/home/imagefm/.cache/huggingface
USER imagefm
WORKDIR /home/imagefm
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
ENTRYPOINT ["imagefm", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "/models/model"]
