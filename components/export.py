"""The export component: the model to serve, with its model card and reference statistics.

    from sonossl.kubeflow.components.export import export
    task = export(clips=..., data_version=..., profile="gpu", ssl=dsl.Collected(ssl_ft.outputs["model"]),
                  scratch=dsl.Collected(scratch_ft.outputs["model"]), metric="planes.val.macro_f1")
    task.outputs["score"]
"""

from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from sonossl.kubeflow.components import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def export(clips: Input[Dataset], data_version: str, profile: str, ssl: Input[List[Model]],
           scratch: Input[List[Model]], metric: str, model: Output[Model],
           metrics: Output[Metrics]) -> NamedTuple("ExportOutputs", model_version=str, score=float):
    """Pick the best plane model, and saliency model when there are saliency runs, by validation score and export
    them (``sonossl.export.export``).

    Args:
        clips: the clip dataset (reference statistics).
        data_version: its version id (part of the cache key).
        profile: the parameter profile.
        ssl: the finetune outputs from the pretrained encoder (ssl-planes, and ssl-saliency when trained).
        scratch: the finetune outputs from random initialisation (scratch-planes, scratch-saliency).
        metric: the metric the deploy gate compares, named as the InferenceService annotates it (planes.val.macro_f1).
        model: the export folder: model.pt, model_card.json/.md, reference/.
        metrics: the exported model's validation and test metrics.

    Returns:
        model_version: the exported model's version id; score: its value of ``metric``.
    """
    from collections import namedtuple

    from sonossl.pipeline.steps import export_step, runs_by_name

    runs = runs_by_name([m.path for m in [*ssl, *scratch]])
    model_version, score, scores = export_step(clips.path, runs, model.path, profile, metric)
    for key, value in scores.items():
        metrics.log_metric(key, value)
    model.metadata.update({"model_version": model_version, "data_version": data_version, metric: score})
    return namedtuple("ExportOutputs", ["model_version", "score"])(model_version, score)
