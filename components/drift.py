"""The drift component: an Evidently drift report over the endpoint's request log, against the model's reference.

    from sonossl.kubeflow.components.drift import drift
    task = drift(model_uri="s3://models/sonossl/export", request_log="s3://logs/sonossl/")   # task.output: bool
"""

from kfp import dsl
from kfp.dsl import HTML, Metrics, Output

from sonossl.kubeflow.components import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def drift(model_uri: str, request_log: str, report: Output[HTML], metrics: Output[Metrics], reports: str = "",
          window_days: int = 1, service_name: str = "sonossl", namespace: str = "sonossl") -> bool:
    """Compare served requests with the training reference (``sonossl.monitor.drift.drift_report``).

    Args:
        model_uri: the served export folder (s3:// or a local folder): its reference statistics; empty: the model
            the InferenceService ``service_name`` serves at the time of the run.
        request_log: the request log (s3:// prefix or local folder).
        report: the Evidently HTML report.
        metrics: the drift summary (shares, scores).
        reports: a folder or s3:// prefix that keeps every report per window, with the index of all windows;
            empty keeps only the artefact.
        window_days: the requests of the last this many whole UTC days before the run (1: yesterday's, the
            window named by its date); 0: the whole log.
        service_name: the InferenceService whose model an empty ``model_uri`` means.
        namespace: its namespace.

    Returns:
        Whether drift passed the configured threshold.
    """
    from sonossl.pipeline.steps import drift_step

    detected, summary = drift_step(model_uri, request_log, report.path, reports, window_days, service_name,
                                   namespace)
    for key, value in summary.items():
        metrics.log_metric(key, value)
    return detected
