"""The deploy component: upload the exported model to the model store and serve it with KServe (optionally as a
canary).

    from sonossl.kubeflow.components.deploy import deploy
    task = deploy(model=exp.outputs["model"], model_store="s3://sonossl/models/export", name="sonossl",
                  namespace="sonossl", image=IMAGE, service_account="sonossl-s3", runtime="sonossl")
"""

from kfp import dsl
from kfp.dsl import Input, Model

from sonossl.kubeflow.components import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def deploy(model: Input[Model], model_store: str, name: str, namespace: str, image: str, service_account: str,
           runtime: str, canary_percent: int = 0, gpu: bool = False, dry_run: bool = False,
           gpu_image: str = "") -> str:
    """Create or update the InferenceService serving ``model`` (``sonossl.deploy.deploy``).

    Args:
        model: the export folder (model.pt, model card, reference statistics).
        model_store: s3:// prefix the model is uploaded under, as <model_store>/<model version>: the storageUri.
        name: the InferenceService's name.
        namespace: its namespace.
        image: the serving image (the project image the pipeline ran).
        gpu_image: the serving image on a GPU node (its CUDA build); empty: ``image`` with ``-cuda``.
        service_account: the service account whose secret gives KServe's storage initializer S3 access.
        runtime: the ServingRuntime's name.
        canary_percent: share of traffic for the new model (0: all of it at once).
        gpu: serve on a GPU node (with ``gpu_image``).
        dry_run: upload nothing and talk to no cluster: only render the InferenceService.

    Returns:
        The InferenceService as applied (or rendered), as JSON.
    """
    from sonossl.pipeline.steps import deploy_step

    return deploy_step(model.path, model_store, name, namespace, (gpu_image or f"{image}-cuda") if gpu else image,
                       canary_percent, service_account, runtime, gpu, dry_run)
