"""Kubeflow components of sonossl: one lightweight Python component per step, all in one image.

Each component is a typed interface with a docstring; its body imports ``sonossl`` inside the container and calls one
function of ``sonossl.pipeline.steps``. They are ``@dsl.component``s with ``install_kfp_package=False`` and no
packages to install: the image (``IMAGE``, tagged with the package version) already holds sonossl and kfp, and
``kfp.local``'s SubprocessRunner runs them with this interpreter. The helpers below add what the cluster needs.

    from sonossl.kubeflow.components import GPU_IMAGE, gpu_step, with_s3_credentials
    task = gpu_step(with_s3_credentials(pretrain(clips=..., data_version=..., profile="gpu")))
    task.set_container_image(GPU_IMAGE)
"""

from __future__ import annotations

from kfp import kubernetes
from kfp.dsl import PipelineTask

from sonossl.pipeline import GPU_IMAGE, IMAGE, S3_SECRET

__all__ = ["IMAGE", "GPU_IMAGE", "S3_SECRET", "gpu_step", "cpu_step", "CPU_REQUESTS", "with_s3_credentials",
           "COMPONENT_OPTIONS"]

# Every component: the project image, nothing installed at run time.
COMPONENT_OPTIONS = {"base_image": IMAGE, "install_kfp_package": False, "packages_to_install": []}
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# optional: on AWS itself a Secret may leave them out (boto3 finds the endpoint, and the region elsewhere)
S3_ENV_OPTIONAL = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


def with_s3_credentials(task: PipelineTask) -> PipelineTask:
    """S3 credentials (and endpoint, region) from the Kubernetes Secret ``S3_SECRET``, as environment variables.
    The key id and secret key are required; the endpoint and region keys are optional, so a Secret without them
    still starts the pod (a required key that is missing fails it with CreateContainerConfigError)."""
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env={k: k for k in S3_ENV})
    return kubernetes.use_secret_as_env(task, secret_name=S3_SECRET,
                                        secret_key_to_env={k: k for k in S3_ENV_OPTIONAL}, optional=True)


# CPU and memory requests of the CPU steps, so that none runs BestEffort (the first pods evicted when a node runs
# short). Sized from each step's peak resident memory on the default profile on a 2-core machine (GNU time's %M):
# export 1,057 MiB (the reference frames through the encoder; the gpu profile's wider encoder and 15,000 frames
# take more), preprocess 137 MiB for the 64 simulated sweeps (its largest process), evaluate 32 MiB; champion and
# deploy import torch with sonossl, 689 MiB; the monitoring pipeline's drift report 768 MiB for a window of 12,000
# frames (5,000 of them scored: --max-frames) against the default model's 2,000 reference frames (the gpu profile's
# 10,000 take more: the embedding check grows with the square of the frames compared), as the drift CronJob's
# request in k8s/. Requests only: a step may use more where the node has it.
CPU_REQUESTS = {"preprocess": ("2", "2Gi"), "evaluate": ("250m", "256Mi"), "export": ("1", "4Gi"),
                "control": ("250m", "1Gi"), "drift": ("1", "2Gi")}


def cpu_step(task: PipelineTask, kind: str) -> PipelineTask:
    """``CPU_REQUESTS[kind]`` as the task's CPU and memory requests."""
    cpu, memory = CPU_REQUESTS[kind]
    return task.set_cpu_request(cpu).set_memory_request(memory)


def gpu_step(task: PipelineTask, gpus: int = 1, shm: str = "16Gi", cpu: str = "8", memory: str = "32Gi",
             memory_limit: str = "64Gi", retries: int = 2) -> PipelineTask:
    """A GPU step: ``nvidia.com/gpu``, the toleration of GPU node pools' usual taint (``nvidia.com/gpu``,
    NoSchedule), CPU and memory requests (the data loader's workers decode and augment on the CPU; without requests
    the pod is BestEffort, the first evicted), a memory limit that also holds the memory-backed ``/dev/shm`` (the
    container default of 64 MiB is too small for the loader's workers; its pages count against the limit), and
    retries with back-off for preempted or failed nodes. The task must run the CUDA image (``GPU_IMAGE``): the
    step fails at once, naming it, when it got a GPU that its torch cannot use."""
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
    task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory_limit)
    kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=shm)
    return task.set_retry(num_retries=retries, backoff_duration="60s", backoff_factor=2.0)
