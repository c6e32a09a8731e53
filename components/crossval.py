"""The crossval component: video classification, k-fold cross-validation grouped by patient (GPU step).

    from sonossl.kubeflow.components.crossval import crossval
    task = crossval(clips=pre.outputs["clips"], data_version=pre.outputs["Output"], profile="gpu")
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Output

from sonossl.kubeflow.components import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def crossval(clips: Input[Dataset], data_version: str, profile: str, results: Output[Artifact],
             report: Output[Markdown], metrics: Output[Metrics], pretrain_epochs: int = 0, folds: int = 0,
             checkpoint_store: str = ""):
    """SSL against scratch, linear probe and fine-tune, k folds grouped by patient, each fold's encoder pretrained
    on its training videos only (``sonossl.train.crossval.crossval``), as the ``crossval`` stage.

    Args:
        clips: the clip dataset; its videos need one label and a patient_id each.
        data_version: its version id (part of the cache key).
        profile: the parameter profile; its ``crossval`` block applies.
        results: the output folder: results.json, metrics.json, the fold runs.
        report: the results table (markdown).
        metrics: video accuracy and per-class F1 of each initialisation and method (<init>/<method>.<metric>).
        pretrain_epochs: overrides the profile's crossval.pretrain_epochs when > 0.
        folds: overrides the profile's crossval.folds when > 0 (at least 2).
        checkpoint_store: an s3:// prefix: the output folder is mirrored there while the step runs, and a retry
            resumes from the fold runs copied (empty: no mirror; a retry starts over).
    """
    from sonossl.pipeline.steps import crossval_step

    for key, value in crossval_step(clips.path, results.path, report.path, profile, pretrain_epochs, folds,
                                    checkpoint_store).items():
        metrics.log_metric(key, value)
    results.metadata.update({"data_version": data_version})
