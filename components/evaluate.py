"""The evaluate component: the results report of the main line (SSL against scratch, per task).

    from components.evaluate import evaluate
    task = evaluate(encoder=pt.outputs["encoder"], ssl_planes=..., ssl_saliency=..., scratch_planes=...,
                    scratch_saliency=...)
"""

from kfp import dsl
from kfp.dsl import Input, Markdown, Metrics, Model, Output

from components import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def evaluate(encoder: Input[Model], ssl_planes: Input[Model], ssl_saliency: Input[Model],
             scratch_planes: Input[Model], scratch_saliency: Input[Model], report: Output[Markdown],
             metrics: Output[Metrics]):
    """Tables of plane detection, saliency and pretext accuracy (``sonossl.evaluate.report.evaluate``).

    Args:
        encoder: the pretrain output (pretext accuracy).
        ssl_planes: finetune output, pretrained encoder, planes.
        ssl_saliency: finetune output, pretrained encoder, saliency.
        scratch_planes: finetune output, random initialisation, planes.
        scratch_saliency: finetune output, random initialisation, saliency.
        report: results.md, the tables the README shows.
        metrics: headline test metrics (<task>/<init>/<method>@<fraction>.<metric>).
    """
    from sonossl.pipeline.steps import evaluate_step

    runs = {"ssl-planes": ssl_planes.path, "ssl-saliency": ssl_saliency.path,
            "scratch-planes": scratch_planes.path, "scratch-saliency": scratch_saliency.path}
    for key, value in evaluate_step(encoder.path, runs, report.path).items():
        metrics.log_metric(key, value)
