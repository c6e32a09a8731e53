"""The preprocess component: a raw dataset (S3 prefix, DVC revision or local folder) -> a versioned clip dataset.

    from sonossl.kubeflow.components.preprocess import preprocess
    task = preprocess(dataset="s3://datasets/raw/sim", profile="default", tasks=["planes", "saliency"])
    # outputs: "clips", "Output" (version)
    test = preprocess_test(dataset="s3://datasets/raw/sim_test", profile="default", tasks=["planes"])  # "": none
"""

from kfp import dsl
from kfp.dsl import Dataset, Output

from sonossl.kubeflow.components import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def preprocess(dataset: str, profile: str, tasks: list, clips: Output[Dataset]) -> str:
    """Decode, validate, crop and resize the raw videos into a clip dataset (``sonossl.data.clips.preprocess``).

    Args:
        dataset: the raw dataset: ``s3://bucket/prefix``, ``dvc://<path>?repo=<url>&rev=<rev>`` or a folder.
        profile: the parameter profile (tiny, default, gpu) of the image's params.yaml.
        tasks: the downstream tasks the pipeline trains; with saliency, the step fails, naming the dataset, when it
            has no gaze maps (before any GPU step starts).
        clips: the clip dataset (frames, index, saliency, meta.json).

    Returns:
        The clip dataset's version id (a hash of the inputs and parameters): later steps take it as a parameter,
        so a cached result is never one of other data. (A key holds the image reference and the profile's name,
        not their contents: give a rebuilt image a new tag.)
    """
    from sonossl.pipeline.steps import preprocess_step

    version = preprocess_step(dataset, clips.path, profile, tasks)
    clips.metadata["version"] = version
    return version


@dsl.component(**COMPONENT_OPTIONS)
def preprocess_test(dataset: str, profile: str, tasks: list, clips: Output[Dataset]) -> str:
    """The independent test set of the finetune steps: ``dataset`` preprocessed as ``preprocess`` does; an empty
    ``dataset`` gives an artifact that says there is none, and the finetune steps score the test split of their
    training clips (``sonossl.pipeline.steps.preprocess_test_step``).

    Args:
        dataset: the raw test dataset (other patients or videos than the training dataset), or "" for none.
        profile: the parameter profile (tiny, default, gpu) of the image's params.yaml.
        tasks: the downstream tasks the pipeline trains; with saliency, the step fails, naming the dataset, when it
            has no gaze maps (before any GPU step starts).
        clips: the test clip dataset, or the marker of none.

    Returns:
        The test clip dataset's version id, or "" for none.
    """
    from sonossl.pipeline.steps import preprocess_test_step

    version = preprocess_test_step(dataset, clips.path, profile, tasks)
    clips.metadata["version"] = version
    return version
