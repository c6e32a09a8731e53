"""Submit a pipeline to a Kubeflow Pipelines cluster through ``kfp.Client``: one run, or a recurring run.

Before anything is compiled or sent, the API's health endpoint is asked once, with a short timeout and no retries:
a host that cannot be reached, that is not a Kubeflow Pipelines API, or that rejects the credentials fails here
with one clear message (``SubmitError``), instead of kfp's retries and tracebacks.

    run = submit("https://kubeflow.example.org/pipeline", "training", params={"dataset": "s3://datasets/raw/sim"},
                 experiment="sonossl", token=os.environ["KF_TOKEN"])
    submit(host, "monitoring", params={...}, schedule="0 6 * * *")   # a recurring run (cron, with seconds optional)
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from sonossl.pipeline.dataset import DVC_SCHEME

HEALTHZ = "/apis/v2beta1/healthz"


class SubmitError(RuntimeError):
    """The cluster could not be reached, or refused the request; the message says which and what to do."""


def _auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_host(host: str, token: str | None = None, timeout: float = 10.0) -> None:
    """Fail with a ``SubmitError`` unless ``host`` answers as a Kubeflow Pipelines API that accepts ``token``."""
    import requests

    if not host.startswith(("http://", "https://")):
        raise SubmitError(f"--host {host!r}: expected an http:// or https:// URL of the Kubeflow Pipelines API "
                          "(e.g. https://kubeflow.example.org/pipeline)")
    url = host.rstrip("/") + HEALTHZ
    try:
        resp = requests.get(url, headers=_auth_headers(token), timeout=timeout, allow_redirects=False)
    except requests.exceptions.Timeout:
        raise SubmitError(f"cannot reach the Kubeflow Pipelines API at {host}: no answer within {timeout:g} s; "
                          "check --host and that this machine can reach the cluster") from None
    except requests.exceptions.RequestException as e:
        reason = type(e).__name__
        if isinstance(e, requests.exceptions.ConnectionError):
            reason = "connection refused or host unknown"
        raise SubmitError(f"cannot reach the Kubeflow Pipelines API at {host} ({reason}); check --host and that "
                          "this machine can reach the cluster (port-forward or ingress)") from None
    if resp.status_code in (401, 403):
        raise SubmitError(f"the Kubeflow Pipelines API at {host} rejected the credentials (HTTP {resp.status_code}"
                          f"{' without a token' if not token else ''}); pass a valid --token (for example "
                          "`kubectl create token <service account> -n <namespace>`)")
    if 300 <= resp.status_code < 400:
        raise SubmitError(f"the Kubeflow Pipelines API at {host} redirects to {resp.headers.get('location')!r} "
                          f"(HTTP {resp.status_code}), which is usually a login page; pass --token")
    if resp.status_code != 200:
        raise SubmitError(f"{url} answered HTTP {resp.status_code}; is {host} the Kubeflow Pipelines API "
                          "(usually https://<kubeflow host>/pipeline)?")
    try:
        resp.json()
    except ValueError:
        raise SubmitError(f"{url} did not answer JSON; is {host} the Kubeflow Pipelines API "
                          "(usually https://<kubeflow host>/pipeline)?") from None


# Locations the cluster's pods read or write, and the forms they can reach there: the raw datasets also from a DVC
# revision (``sonossl.pipeline.dataset``), the rest from S3 only. Empty, where a parameter allows it, means none.
REMOTE_LOCATIONS = {"dataset": ("s3://", DVC_SCHEME), "test_dataset": ("s3://", DVC_SCHEME), "request_log": ("s3://",),
                    "reports": ("s3://",), "model_uri": ("s3://",), "model_store": ("s3://",),
                    "checkpoint_store": ("s3://",)}


GIT_URLS = ("https://", "http://", "ssh://", "git://", "git@")  # a repository a pod can clone


def _check_run_arguments(pipeline: str, arguments: dict[str, Any]) -> None:
    """A run needs a value for each parameter without a default, and a cluster's pods cannot read or write a folder
    of this machine (what a pod writes to its own disk is lost with it): each location in ``REMOTE_LOCATIONS`` must
    have one of its forms, and a DVC location a git repository the pods can clone; anything else fails here, before
    anything is sent."""
    from sonossl.config import ParamsError
    from sonossl.pipeline.dataset import parse_dvc_location
    from sonossl.pipeline.spec import required_parameters

    for key in required_parameters(pipeline):
        if arguments.get(key) in (None, ""):
            raise ParamsError(f"the {pipeline} pipeline needs --param {key}=... (it has no default)")
    for key, forms in REMOTE_LOCATIONS.items():
        value = arguments.get(key)
        if isinstance(value, str) and value and not value.startswith(forms):
            raise ParamsError(f"pipeline parameter {key}={value!r}: a cluster run reaches {' or '.join(forms)} "
                              "locations, not a folder of this machine; push a local folder first (`sonossl "
                              f"artifacts push {value} s3://BUCKET/PREFIX`), or run here with `sonossl pipeline "
                              "run-local`")
        if isinstance(value, str) and value.startswith(DVC_SCHEME):
            repo = parse_dvc_location(value).repo
            if not (repo or "").startswith(GIT_URLS):
                raise ParamsError(f"pipeline parameter {key}={value!r}: a pod has no git checkout of its own; give "
                                  "the repository it clones as repo=<git URL> (https://, ssh:// or git@...), e.g. "
                                  "dvc://data/raw/sim?repo=https://github.com/org/sonossl.git&rev=v0.1.0")


def submit(host: str, pipeline: str = "training", params: dict[str, str] | None = None, *,
           namespace: str | None = None, experiment: str = "sonossl", token: str | None = None,
           run_name: str | None = None, schedule: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """Compile ``pipeline`` with ``params`` (``key -> text``, typed by the pipeline) and start it on ``host``.

    Returns ``{"run_id" or "recurring_run_id", "experiment", "url"}``."""
    import warnings

    import kfp
    import kfp_server_api
    import urllib3

    from sonossl.pipeline.spec import compile_pipeline, typed_parameters

    arguments = typed_parameters(pipeline, params or {})  # bad names and values fail before any network call
    _check_run_arguments(pipeline, arguments)
    cron = _cron(schedule) if schedule else None
    check_host(host, token, timeout)
    try:
        with warnings.catch_warnings():  # "only works with KFP v2": the healthz answer already said it is v2
            warnings.simplefilter("ignore", FutureWarning)
            client = kfp.Client(host=host, existing_token=token, namespace=namespace or "kubeflow")
        with tempfile.TemporaryDirectory(prefix="sonossl-submit-") as tmp:
            package = compile_pipeline(pipeline, Path(tmp) / f"{pipeline}.yaml")
            if cron:
                exp = client.create_experiment(experiment, namespace=namespace)
                job = client.create_recurring_run(
                    exp.experiment_id, run_name or f"sonossl-{pipeline}", pipeline_package_path=str(package),
                    params=arguments, cron_expression=cron, enable_caching=False)
                return {"recurring_run_id": job.recurring_run_id, "experiment": experiment, "schedule": schedule,
                        "url": f"{host.rstrip('/')}/#/recurringrun/details/{job.recurring_run_id}"}
            result = client.create_run_from_pipeline_package(
                str(package), arguments=arguments, run_name=run_name, experiment_name=experiment,
                namespace=namespace)
            return {"run_id": result.run_id, "experiment": experiment,
                    "url": f"{host.rstrip('/')}/#/runs/details/{result.run_id}"}
    except kfp_server_api.ApiException as e:
        if e.status in (401, 403):
            raise SubmitError(f"the Kubeflow Pipelines API at {host} rejected the credentials (HTTP {e.status}); "
                              "pass a valid --token") from None
        raise SubmitError(f"the Kubeflow Pipelines API at {host} refused the request: HTTP {e.status} "
                          f"{e.reason}: {(e.body or '').strip()[:300]}") from None
    except (urllib3.exceptions.HTTPError, ConnectionError) as e:
        raise SubmitError(f"lost the connection to the Kubeflow Pipelines API at {host}: {e}") from None


def _cron(schedule: str) -> str:
    """KFP takes six-field cron (with seconds); accept the usual five fields too."""
    fields = schedule.split()
    if len(fields) == 5:
        return "0 " + schedule.strip()
    if len(fields) == 6:
        return schedule.strip()
    raise ValueError(f"--schedule {schedule!r}: expected a cron expression of 5 fields (minute hour day month "
                     "weekday) or 6 (with seconds first)")
