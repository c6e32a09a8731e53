"""The monitoring pipeline: an Evidently drift report over the endpoint's request log, meant for a recurring run
(``sonossl pipeline submit --pipeline monitoring --schedule "0 6 * * *" ...``). Each run reports on the days since
the last (``window_days``, yesterday by default), on the model the InferenceService serves at the time unless
``model_uri`` names one, as the drift CronJob in ``k8s/`` does.

    kfp dsl compile --py pipelines/monitoring.py --output monitoring.yaml
"""

from kfp import dsl

from sonossl.kubeflow.components import cpu_step, with_s3_credentials
from sonossl.kubeflow.components.drift import drift
from sonossl.pipeline import IMAGE


@dsl.pipeline(name="sonossl-monitoring",
              description="Drift of the served model's requests against its training reference (Evidently).")
def monitoring(request_log: str, model_uri: str = "", reports: str = "", window_days: int = 1,
               service_name: str = "sonossl", namespace: str = "sonossl", image: str = IMAGE):
    """Args:
        request_log: the endpoint's request log (s3:// prefix).
        model_uri: the served export folder (s3:// prefix): its reference statistics and model version; empty (the
            default): the model the InferenceService service_name serves when the run starts, so that a schedule
            follows promotions (the run's service account must be allowed to read InferenceServices).
        reports: an s3:// prefix that keeps every report and the index of windows; empty keeps the artefact only.
        window_days: report on the requests of the last this many whole UTC days (1: yesterday's, for a daily
            schedule); 0: the whole log.
        service_name: the InferenceService whose model an empty model_uri means.
        namespace: its namespace.
        image: the project image (its tag follows the package version).
    """
    task = drift(model_uri=model_uri, request_log=request_log, reports=reports, window_days=window_days,
                 service_name=service_name, namespace=namespace)
    # Each run reads new requests: never served from the cache.
    cpu_step(with_s3_credentials(task), "drift").set_container_image(image).set_caching_options(False)
    # Not retried: a window with too few frames fails the same at every try; the next scheduled run is the retry.
