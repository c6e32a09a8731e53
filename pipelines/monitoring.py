"""The monitoring pipeline: an Evidently drift report over the endpoint's request log, meant for a recurring run
(``sonossl pipeline submit --pipeline monitoring --schedule "0 6 * * *" ...``).

    kfp dsl compile --py pipelines/monitoring.py --output monitoring.yaml
"""

from kfp import dsl

from components import with_s3_credentials
from components.drift import drift
from sonossl.pipeline import IMAGE


@dsl.pipeline(name="sonossl-monitoring",
              description="Drift of the served model's requests against its training reference (Evidently).")
def monitoring(model_uri: str, request_log: str, reports: str = "", image: str = IMAGE):
    """Args:
        model_uri: the served export folder (s3:// prefix): its reference statistics and model version.
        request_log: the endpoint's request log (s3:// prefix).
        reports: an s3:// prefix that keeps every report and the index of windows; empty keeps the artefact only.
        image: the project image (its tag follows the package version).
    """
    task = drift(model_uri=model_uri, request_log=request_log, reports=reports)
    # Each run reads new requests: never served from the cache.
    with_s3_credentials(task).set_container_image(image).set_caching_options(False)
    task.set_retry(num_retries=2, backoff_duration="60s")
