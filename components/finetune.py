"""The finetune component: downstream training from a pretrained encoder, or from scratch (GPU step).

    from sonossl.kubeflow.components.finetune import finetune
    ssl = finetune(clips=..., data_version=..., profile="gpu", task="planes", name="ssl-planes", encoder=enc)
    scratch = finetune(clips=..., data_version=..., profile="gpu", task="planes", name="scratch-planes")
    scored = finetune(clips=..., data_version=..., profile="gpu", task="planes", name="ssl-planes", encoder=enc,
                      test_clips=test)   # scored on every frame of an independent clip dataset
"""

from typing import Optional

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from sonossl.kubeflow.components import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def finetune(clips: Input[Dataset], data_version: str, profile: str, task: str, name: str, model: Output[Model],
             metrics: Output[Metrics], encoder: Optional[Input[Model]] = None,
             test_clips: Optional[Input[Dataset]] = None, test_data_version: str = "", epochs: int = 0,
             learning_rate: float = 0.0, checkpoint_store: str = ""):
    """Linear probe and fine-tune at the profile's label fractions (``sonossl.train.finetune.finetune``).

    Args:
        clips: the clip dataset (with labels and saliency maps).
        data_version: its version id (part of the cache key).
        profile: the parameter profile.
        task: planes (standard-plane detection) or saliency.
        name: the run's name, <init>-<task> (ssl-planes, scratch-saliency...), as evaluate and export read it.
        model: the output folder: model.pt (best run by validation), metrics.json, runs/.
        metrics: validation and test scores of every run (<method>@<fraction>.<split>.<metric>).
        encoder: a pretrain output; none trains from random initialisation (the scratch baseline).
        test_clips: an independent clip dataset (other patients or videos) whose every labelled frame is the test
            set, from preprocess or preprocess_test; none, or a preprocess_test output for no dataset, scores the test
            split of ``clips``. It must fit ``clips`` (frame size, shared classes) and share no patient or video with
            it: the step fails, naming the dataset, when it does not.
        test_data_version: its version id (part of the cache key; empty for none).
        epochs: overrides the profile's epochs when > 0.
        learning_rate: overrides the profile's learning rate when > 0.
        checkpoint_store: an s3:// prefix: the output folder is mirrored there while the step runs, and a retry
            resumes from the last epoch copied (empty: no mirror; a retry starts over).
    """
    from sonossl.pipeline.steps import finetune_step

    scores = finetune_step(clips.path, model.path, profile, task, name, encoder.path if encoder else None, epochs,
                           learning_rate, test_clips.path if test_clips else None, checkpoint_store)
    for key, value in scores.items():
        metrics.log_metric(key, value)
    model.metadata.update({"data_version": data_version, "test_data_version": test_data_version, "task": task,
                           "name": name})
