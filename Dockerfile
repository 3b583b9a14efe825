# One image for every mesh component: `mesh serve router|runtime|controller` (deploy/ runs it).
#   docker build -t ghcr.io/mesh-serving/mesh:0.1.0 .
# The registry name is a placeholder: tag and push to yours, and set it in deploy/kustomization.yaml.
#
# The runtimes extra brings every built-in loader (xgboost, lightgbm, onnxruntime, openvino, torch). torch
# from PyPI carries CUDA libraries (GBs); for a CPU-only image, build with
#   --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
FROM python:3.11-slim

ARG PIP_EXTRA_INDEX_URL
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY mesh ./mesh
COPY placement ./placement
COPY loadtest ./loadtest
RUN pip install ".[runtimes]" && rm -rf /src

# Non-root; /models is where runtimes read model files (deploy/base/runtime.yaml mounts a volume
# there), owned by the same user so that an init container or puller running as it can write.
RUN groupadd --gid 10001 mesh \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mesh \
    && mkdir /models && chown 10001:10001 /models
USER 10001:10001
WORKDIR /models

# 8033: router gRPC; 8085: runtime gRPC; 2112: metrics.
EXPOSE 8033 8085 2112
ENTRYPOINT ["mesh"]
CMD ["--help"]
