# pathflow worker image: the project and its locked dependencies on a CUDA PyTorch base.
#
#   PUSH=0 container/build-push.sh     # GPU image (official PyTorch CUDA runtime base) as pathflow:<version>
#   docker build --build-arg VERSION="$(container/version)" -t "pathflow:$(container/version)" .   # the same
#   container/build-local.sh           # CPU image with buildah, no Docker engine (CI)
# VERSION is pyproject.toml's version (container/version); the build stops if they differ.
#
# BASE_IMAGE must provide python3 (>= 3.10) with the venv module. The project's virtual environment sees
# the base's site-packages, so the base's CUDA PyTorch is used as it is and never downloaded again.
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

FROM ${BASE_IMAGE} AS build
# Requirements beyond the project, e.g. "torch==2.13.0" for a base without PyTorch; wheels placed in
# container/wheels/ are found first (the CI build puts the CPU PyTorch wheel there).
ARG EXTRA_REQUIREMENTS=""
ARG EXTRAS="s3,gcs,docker"
# A CA bundle mounted for the build only (behind a TLS-inspecting proxy); never copied into the image.
ARG BUILD_CA_BUNDLE=""
ARG VERSION
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY container/wheels/ container/wheels/
COPY pathflow/ pathflow/
COPY pathflow_cli/ pathflow_cli/
COPY flows/ flows/
COPY tasks/ tasks/
COPY storage/ storage/
# Every version comes from constraints.txt (the lock file), so pins in this line would only repeat it.
# hadolint ignore=DL3013
RUN if [ -n "$BUILD_CA_BUNDLE" ]; then export PIP_CERT="$BUILD_CA_BUNDLE"; fi \
    && python3 -m venv --system-site-packages /opt/pathflow \
    && /opt/pathflow/bin/pip install --no-cache-dir --disable-pip-version-check --find-links container/wheels -c constraints.txt ${EXTRA_REQUIREMENTS} ".[${EXTRAS}]" \
    && find /opt/pathflow -name __pycache__ -prune -exec rm -rf {} + \
    && installed=$(/opt/pathflow/bin/python -c "import importlib.metadata as m; print(m.version('pathflow'))") \
    && if [ "$installed" != "$VERSION" ]; then \
         echo "build with --build-arg VERSION=$installed (pyproject.toml's version), not '$VERSION'" >&2; exit 1; \
       fi

FROM ${BASE_IMAGE}
ARG VERSION
LABEL org.opencontainers.image.title="pathflow" \
      org.opencontainers.image.description="Find and validate pathways to causal SAE features: Prefect worker" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed uid (USER below is numeric, so runAsNonRoot and volume owners can check it).
RUN useradd --create-home --uid 10001 --user-group pathflow \
    && mkdir -p /data/store /home/pathflow/.cache/huggingface /home/pathflow/work \
    && chown -R pathflow:pathflow /data/store /home/pathflow
COPY --from=build /opt/pathflow /opt/pathflow
# The flow code for deployments (prefect.yaml's pull step sets this as the working directory).
COPY prefect.yaml /opt/pathflow/app/
COPY pathflow/ /opt/pathflow/app/pathflow/
COPY pathflow_cli/ /opt/pathflow/app/pathflow_cli/
COPY flows/ /opt/pathflow/app/flows/
COPY tasks/ /opt/pathflow/app/tasks/
COPY storage/ /opt/pathflow/app/storage/
# HF_HUB_OFFLINE is not set here: pass -e HF_HUB_OFFLINE=1 to use only the mounted cache.
ENV PATH=/opt/pathflow/bin:$PATH \
    PATHFLOW_PROJECT_DIR=/opt/pathflow/app \
    PATHFLOW_STORE=/data/store \
    HF_HOME=/home/pathflow/.cache/huggingface \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MALLOC_ARENA_MAX=2
VOLUME ["/home/pathflow/.cache/huggingface", "/data/store"]
USER 10001:10001
WORKDIR /home/pathflow/work
# A worker for the GPU pool (set PREFECT_API_URL). For a docker pool, mount the Docker socket; the
# flow runs it starts use this same image. `docker run … pathflow local` runs the demo instead.
CMD ["prefect", "worker", "start", "--pool", "pathflow-gpu"]
