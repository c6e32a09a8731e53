"""The champion component: the deploy gate. Does the new model beat the one being served?

    from sonossl.kubeflow.components.champion import champion
    gate = champion(name="sonossl", namespace="models", metric="planes.val.macro_f1", score=exp.outputs["score"])
    with dsl.If(gate.output == "deploy"): ...
"""

from kfp import dsl

from sonossl.kubeflow.components import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def champion(name: str, namespace: str, metric: str, score: float) -> str:
    """Compare ``score`` with the serving champion's ``metric`` (``sonossl.deploy.champion_metric``).

    Args:
        name: the InferenceService's name.
        namespace: its namespace.
        metric: the metric compared, as the InferenceService annotates it, e.g. planes.val.macro_f1 (higher is better).
        score: the new model's value of it.

    Returns:
        ``deploy`` when the new model is better or nothing is serving (no cluster either), else ``keep``.
    """
    from sonossl.pipeline.steps import champion_step

    return champion_step(name, namespace, metric, score)
