"""The pretrain component: pretext training of the frame encoder on the clip dataset (GPU step).

    from sonossl.kubeflow.components.pretrain import pretrain
    task = pretrain(clips=pre.outputs["clips"], data_version=pre.outputs["Output"], profile="gpu")
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from sonossl.kubeflow.components import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def pretrain(clips: Input[Dataset], data_version: str, profile: str, encoder: Output[Model],
             metrics: Output[Metrics], mode: str = "both-sequential", epochs: int = 0,
             learning_rate: float = 0.0, checkpoint_store: str = ""):
    """Train the encoder on the pretext tasks (``sonossl.train.pretrain.pretrain``), as ``pretrain@<mode>``.

    Args:
        clips: the clip dataset.
        data_version: its version id (part of the cache key).
        profile: the parameter profile.
        encoder: the output folder: encoder.pt, metrics.json, curves.
        metrics: held-out pretext accuracy per head, and chance.
        mode: pretext mode: order, transform, both-sequential, both-parallel.
        epochs: overrides the profile's epochs when > 0.
        learning_rate: overrides the profile's learning rate when > 0.
        checkpoint_store: an s3:// prefix: the output folder is mirrored there while the step runs, and a retry
            resumes from the last epoch copied (empty: no mirror; a retry starts over).
    """
    from sonossl.pipeline.steps import pretrain_step

    for key, value in pretrain_step(clips.path, encoder.path, profile, mode, epochs, learning_rate,
                                    checkpoint_store).items():
        metrics.log_metric(key, value)
    encoder.metadata.update({"data_version": data_version, "mode": mode})
