"""The evaluate component: the results report of the main line (SSL against scratch, per task).

    from sonossl.kubeflow.components.evaluate import evaluate
    task = evaluate(encoder=pt.outputs["encoder"], ssl=dsl.Collected(ssl_ft.outputs["model"]),
                    scratch=dsl.Collected(scratch_ft.outputs["model"]))   # finetune tasks in dsl.ParallelFor
"""

from typing import List

from kfp import dsl
from kfp.dsl import Input, Markdown, Metrics, Model, Output

from sonossl.kubeflow.components import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def evaluate(encoder: Input[Model], ssl: Input[List[Model]], scratch: Input[List[Model]], report: Output[Markdown],
             metrics: Output[Metrics]):
    """Tables of plane detection, saliency and pretext accuracy (``sonossl.evaluate.report.evaluate``).

    Args:
        encoder: the pretrain output (pretext accuracy).
        ssl: the finetune outputs from the pretrained encoder (ssl-planes, and ssl-saliency when trained).
        scratch: the finetune outputs from random initialisation (scratch-planes, scratch-saliency).
        report: results.md, the tables the README shows.
        metrics: headline test metrics (<task>/<init>/<method>@<fraction>.<metric>).
    """
    from sonossl.pipeline.steps import evaluate_step, runs_by_name

    runs = runs_by_name([m.path for m in [*ssl, *scratch]])
    for key, value in evaluate_step(encoder.path, runs, report.path).items():
        metrics.log_metric(key, value)
