"""Kubeflow Pipelines for sonossl: the library side of ``components/`` and ``pipelines/``.

The components (``components/``) and pipelines (``pipelines/``) are thin: each component body calls one function of
``sonossl.pipeline.steps``, which calls the same library step a DVC stage calls. This package also compiles the
pipelines (``spec``), submits them to a cluster (``submit``) and runs the training pipeline on this machine with
``kfp.local`` (``local``). All of them run in one image, tagged with the package version:

    from sonossl.pipeline import IMAGE        # ghcr.io/sonossl/sonossl:<sonossl version> (GPU_IMAGE: <...>-cuda)
    sonossl pipeline compile --out dist/pipelines
    sonossl pipeline run-local --out runs/local --profile tiny
"""

from __future__ import annotations

from sonossl.deploy import DEFAULT_IMAGE as IMAGE  # the tag follows the package version

GPU_IMAGE = f"{IMAGE}-cuda"  # the same release built with CUDA torch (the Dockerfile's VARIANT=cuda): the GPU steps
# Kubernetes Secret holding the S3 credentials (k8s/ creates it); its keys become the tasks' environment.
S3_SECRET = "sonossl-s3"
