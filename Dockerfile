# One image for every diffmesh process: the four stage services and the orchestrator
# (`diffmesh serve <stage>`) and the trainer (`python -m trainer`). k8s/ runs it.
#
#   docker build -t diffmesh:0.1.0 .                                      # CPU torch
#   docker build --build-arg TORCH_VARIANT=cu128 -t diffmesh:0.1.0-cuda .  # CUDA torch (the node brings the driver)
#
# TORCH_VARIANT is a wheel index of download.pytorch.org that publishes torch ${TORCH_VERSION} (cpu, cu128, ...).

FROM python:3.11-slim AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/diffmesh
ENV PATH=/opt/diffmesh/bin:$PATH
# torch first and pinned, from the variant's own index: an unpinned torch from PyPI brings CUDA packages.
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY services/ services/
COPY orchestrator/ orchestrator/
COPY trainer/ trainer/
# The generated gRPC modules are never committed: generate them here, as `make protos` does, so that the
# (non-editable, no dev extras) install below packages them with the rest.
RUN pip install "grpcio-tools>=1.66" \
    && python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. protos/*.proto \
    && pip install . \
    && pip check

FROM python:3.11-slim
# checkov:skip=CKV_DOCKER_2: no HEALTHCHECK; Kubernetes ignores it and probes grpc.health.v1 natively (k8s/)
# MALLOC_ARENA_MAX=2: glibc's per-thread arenas grew the text encoder by 200 MB under load, 90 MB with 2
ENV PATH=/opt/diffmesh/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/diffmesh \
    DIFFMESH_HOST=0.0.0.0 \
    DIFFMESH_PORT=50051 \
    MALLOC_ARENA_MAX=2
RUN groupadd --gid 10001 diffmesh \
    && useradd --uid 10001 --gid 10001 --home-dir /home/diffmesh --create-home --shell /usr/sbin/nologin diffmesh
COPY --from=build /opt/diffmesh /opt/diffmesh
WORKDIR /home/diffmesh
USER 10001:10001
EXPOSE 50051
# SIGTERM drains in-flight calls for --grace seconds, then exits.
ENTRYPOINT ["diffmesh"]
CMD ["serve", "orchestrator", "--host", "0.0.0.0"]
