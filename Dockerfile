# syntax=docker/dockerfile:1
# The one sonossl image: every pipeline step (`sonossl <step>`), the Kubeflow components and the KServe model
# server (`python -m sonossl.serve`). VARIANT picks the torch build:
#   docker build --build-arg VARIANT=cpu  -t ghcr.io/sonossl/sonossl:0.1.0      .
#   docker build --build-arg VARIANT=cuda -t ghcr.io/sonossl/sonossl:0.1.0-cuda .
# The tag follows the package version (pyproject.toml); the cuda variant adds "-cuda".
ARG VARIANT=cpu
# Python 3.11 on Debian bookworm, the tag Docker keeps rebuilding with security fixes (a patch tag such as 3.11.7 is
# frozen); pin a digest (python:3.11-slim-bookworm@sha256:...) and bump it on purpose for byte-for-byte rebuilds.
ARG BASE_IMAGE_CPU=python:3.11-slim-bookworm
# The cu130 torch wheels carry CUDA's user-space libraries (cuBLAS, cuDNN, NCCL) as pip packages, and the node's
# NVIDIA container toolkit mounts the driver: a plain Python base serves both. An nvidia/cuda base works too
# (--build-arg BASE_IMAGE_CUDA=...) if it has Python 3.11 and no user or group 1000 yet (Ubuntu 24.04's have
# `ubuntu` there: remove it first, or the groupadd below fails).
ARG BASE_IMAGE_CUDA=python:3.11-slim-bookworm

FROM ${BASE_IMAGE_CPU} AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM ${BASE_IMAGE_CUDA} AS base-cuda
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM base-${VARIANT}
ARG VARIANT
ARG SONOSSL_VERSION=0.1.0
LABEL org.opencontainers.image.title="sonossl" \
      org.opencontainers.image.description="Self-supervised learning for ultrasound video: pipeline steps and KServe model server" \
      org.opencontainers.image.version="${SONOSSL_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.sonossl.variant="${VARIANT}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    SONOSSL_VARIANT=${VARIANT}

RUN python -m venv /opt/venv
# torch first, from the variant's wheel index, at the versions pinned in pyproject.toml; `pip install .` then
# keeps it (2.14.1+cpu satisfies ==2.14.1) and installs everything else at its pin.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1

WORKDIR /app
# The dependencies next, from pyproject.toml alone, in a layer of their own: a change to the code (src, components,
# pipelines, params.yaml, the README) rebuilds only the small layers below, not this one (about 1.5 GB installed
# besides torch, measured in this machine's virtualenv).
# constraints.txt: every other package at the version the tests last passed with (not whatever is newest today).
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
COPY README.md LICENSE ./
COPY src ./src
# the Kubeflow component and pipeline definitions, so `sonossl pipeline compile --out /work/pipelines` works inside
# the image too (with --out: /app, where the default dist/pipelines would go, belongs to root, not the image's user)
COPY components ./components
COPY pipelines ./pipelines
# the package itself, on the dependencies above (`pip check` fails the build if pyproject.toml asked for more),
# built with a pinned setuptools (the one the tests' virtualenv has) instead of whatever is newest
RUN pip install setuptools==84.2.1 \
 && pip install --no-deps . --no-build-isolation \
 && pip check \
 && python -c "import sonossl, torch; print('sonossl', sonossl.__version__, 'torch', torch.__version__)"
# `sonossl <step>` reads ./params.yaml by default: the profiles travel with the image. The pipeline steps read
# $SONOSSL_PARAMS, set here so that they find it whatever working directory a task starts in, and so does
# `sonossl <step>` started in a folder without a params.yaml of its own (`docker run -w /work ...`).
COPY params.yaml ./
ENV SONOSSL_PARAMS=/app/params.yaml

# A fixed non-root uid, so pod securityContexts (runAsNonRoot, runAsUser: 1000) match the image.
RUN groupadd --gid 1000 sonossl \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/sonossl --shell /usr/sbin/nologin sonossl \
 && mkdir -p /work && chown sonossl:sonossl /work
USER 1000:1000
ENV HOME=/home/sonossl

# No ENTRYPOINT: `docker run IMAGE sonossl preprocess ...` runs a step, `docker run IMAGE python -m sonossl.serve ...`
# the model server, and Kubeflow and KServe set the command themselves.
EXPOSE 8080
CMD ["sonossl", "--help"]
