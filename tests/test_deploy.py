"""The deploy step (``sonossl.deploy``): the rendered InferenceService, its checks, and the create/update flow.

Dry runs are checked strictly against KServe's types. No cluster runs here, so the create/update flow talks, through
the real kserve and kubernetes clients, to a minimal stand-in of the Kubernetes API's custom-object endpoints on
127.0.0.1 (get, create, replace with resourceVersion), and reads the model card from a real local S3 server.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import send_json
from sonossl.deploy import DeployError, champion_metric, deploy
from sonossl.manifests import check

ARGS = dict(name="sonossl", namespace="sonossl", image="ghcr.io/sonossl/sonossl:0.1.0", service_account="sonossl-s3")


@pytest.fixture(scope="module")
def tiny_export(tiny_clips, tiny_params, tmp_path_factory) -> Path:
    """A real export (model card included) of scratch models on the tiny profile: about 15 s."""
    from sonossl.config import as_dict
    from sonossl.export import export
    from sonossl.train.finetune import finetune

    root = tmp_path_factory.mktemp("deploy")
    spec = as_dict(tiny_params.pretrain.encoder)
    for task in ("planes", "saliency"):
        finetune(tiny_clips, root / f"ft/scratch-{task}", tiny_params.finetune, task=task, encoder_spec=spec,
                 fractions=[1.0], progress=False)
    export(tiny_clips, root / "ft", root / "export", tiny_params)
    return root / "export"


def test_dry_run_renders_a_valid_inferenceservice_with_the_card(tiny_export):
    card = json.loads((tiny_export / "model_card.json").read_text())
    isvc = deploy("s3://models/sonossl/v1/", canary_percent=10, model_card=tiny_export, dry_run=True, **ARGS)
    check(isvc)  # strictly against kserve.models.V1beta1InferenceService
    p = isvc["spec"]["predictor"]
    assert p["model"]["storageUri"] == "s3://models/sonossl/v1/"  # a folder: KServe lists its objects by prefix
    assert isvc["metadata"]["annotations"]["sonossl.io/model-uri"] == "s3://models/sonossl/v1"
    assert p["serviceAccountName"] == "sonossl-s3" and p["canaryTrafficPercent"] == 10
    assert p["model"]["modelFormat"] == {"name": "sonossl"} and p["model"]["runtime"] == "sonossl"
    assert p["model"]["image"] == ARGS["image"]
    assert p["model"]["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert p["model"]["resources"]["limits"] and p["minReplicas"] == 0 and "tolerations" not in p
    ann = isvc["metadata"]["annotations"]
    assert ann["sonossl.io/model-version"] == card["model_version"]
    assert ann["sonossl.io/feature-version"] == card["data"]["feature_version"]
    assert float(ann["sonossl.io/planes.test.macro_f1"]) == pytest.approx(card["metrics"]["planes"]["test"]["macro_f1"])
    assert float(ann["sonossl.io/saliency.val.cc"]) == pytest.approx(card["metrics"]["saliency"]["val"]["cc"])
    assert "sonossl.io/saliency.val.n" not in ann  # a count, not a metric
    assert isvc["metadata"]["labels"]["sonossl.io/model-version"] == card["model_version"]


def test_dry_run_on_gpu():
    isvc = deploy("s3://models/sonossl/v1", canary_percent=None, gpu=True, dry_run=True, **ARGS)
    check(isvc)
    p = isvc["spec"]["predictor"]
    assert p["minReplicas"] == 1 and "canaryTrafficPercent" not in p
    assert p["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert p["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]


@pytest.mark.parametrize("change, error", [
    ({"model_uri": "models/export"}, r"model_uri \(--model-uri\) 'models/export': KServe fetches the model from S3"),
    ({"model_uri": "gs://bucket/model"}, r"s3://BUCKET/PREFIX"),
    ({"model_uri": "s3://Bad_Bucket/m"}, r"'Bad_Bucket' is not a valid S3 bucket name"),
    ({"model_uri": "s3://models/"}, r"names a whole bucket"),
    ({"canary_percent": 101}, r"canary_percent \(--canary-percent\) 101: give a whole percentage 0-100"),
    ({"canary_percent": -5}, r"canary_percent \(--canary-percent\) -5"),
    ({"canary_percent": 12.5}, r"canary_percent \(--canary-percent\) 12.5"),
    ({"canary_percent": True}, r"canary_percent \(--canary-percent\) True"),
    ({"name": "Sonossl_1"}, r"name \(--name\) 'Sonossl_1' is not a valid InferenceService name"),
    ({"name": "x" * 46}, r"at most 45 characters"),
    ({"namespace": "my ns"}, r"namespace \(--namespace\) 'my ns'"),
    ({"service_account": ""}, r"service_account \(--service-account\) ''"),
    ({"image": ""}, r"image \(--image\) '': not a container image reference"),
    ({"image": "UPPER/Case:tag"}, r"'UPPER/Case:tag': not a container image reference .* the path in lower case"),
    ({"image": "ghcr.io/sonossl/sonossl:0.1.0 "}, r"not a container image reference"),
    ({"image": "ghcr.io/sonossl/sonossl:bad tag"}, r"not a container image reference"),
    ({"model_uri": "s3://models/sonossl/v1/model_card.json"}, r"names a file of the export; give its folder"),
])
def test_bad_arguments_fail_with_a_clear_error(change, error):
    kwargs = {"model_uri": "s3://models/sonossl/v1", "canary_percent": None, **ARGS, **change}
    with pytest.raises(ValueError, match=error):
        deploy(kwargs.pop("model_uri"), dry_run=True, **kwargs)


def test_image_references_kubernetes_pulls_are_taken():
    from sonossl.deploy import image_problem

    for ok in ("ghcr.io/sonossl/sonossl:0.1.0", "ghcr.io/sonossl/sonossl:0.1.0-cuda", "sonossl", "library/x:1",
               "registry.example.com:5000/team/sonossl:0.1.0-abc1234", "localhost/sonossl", "Registry.Example.com/x",
               "ghcr.io/sonossl/sonossl@sha256:" + "a" * 64, "ghcr.io/a/b:t@sha256:" + "0" * 64,
               "ghcr.io/" + "a" * 240 + "@sha256:" + "0" * 64):  # 255 is the name's limit, the digest aside
        assert image_problem(ok) is None, ok
    for bad in ("", "UPPER/case", "ghcr.io/Sonossl/x", "x:", "x::1", "-x", "x/", "ghcr.io/x:" + "t" * 129, None, 3,
                "ghcr.io/a/b:t\u00e4g", "ghcr.io/a/b:\u0663", "ghcr.io/" + "a" * 250):
        assert image_problem(bad), bad


def test_a_bad_model_card_fails_with_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model card"):
        deploy("s3://models/v1", canary_percent=None, model_card=tmp_path, dry_run=True, **ARGS)
    card = tmp_path / "model_card.json"
    for text, error in [('{"metrics": {}}', r"model_card.json: not a model card \(no model_version\)"),
                        ('{"model_version": "abc", "metrics": [1, 2]}', r"`metrics` is not task -> split ->"),
                        ('{"model_version": "abc", "metrics": {"planes": {"val": 0.5}}}', r"`metrics` is not"),
                        ('{"model_version": "abc", "data": "x"}', r"`data` is not an object of versions"),
                        ('{"model_version": null}', r"model_version None is not a model version"),
                        ('{"model_version": "ab c"}', r"model_version 'ab c' is not a model version"),
                        ('{"model_version": "' + "a" * 64 + '"}', r"at most 63 letters"),
                        ("[" * 100_000, r"not a valid model card: nested too deeply"),
                        ('{"model_version": "abc", "metrics": {"planes": {"val": {"' + "f" * 60 + '": 0.5}}}}',
                         r"cannot be an annotation name \(at most 63 letters")]:
        card.write_text(text)
        with pytest.raises(ValueError, match=error):
            deploy("s3://models/v1", canary_percent=None, model_card=tmp_path, dry_run=True, **ARGS)
    card.write_text('{"model_version": "abc", "metrics": {"planes": {"val": {"macro_f1": 1' + "0" * 400 + '}}}}')
    isvc = deploy("s3://models/v1", canary_percent=None, model_card=card, dry_run=True, **ARGS)  # beyond a float:
    assert "sonossl.io/planes.val.macro_f1" not in isvc["metadata"]["annotations"]  # left out, as NaN is
    card.write_bytes(b'{"model_version": "\xff"}')
    with pytest.raises(ValueError, match=rf"{card}: not a valid model card: not UTF-8 text \(invalid start byte"):
        deploy("s3://models/v1", canary_percent=None, model_card=card, dry_run=True, **ARGS)


def test_cli_dry_run_prints_the_inferenceservice_as_yaml(tiny_export, capsys):
    from sonossl.cli import main

    rc = main(["deploy", "--model-uri", "s3://models/sonossl/v1", "--name", "ultrasound", "--namespace", "serving",
               "--canary-percent", "25", "--service-account", "sa-s3", "--gpu", "--model-card", str(tiny_export),
               "--dry-run"])
    assert rc == 0
    isvc = yaml.safe_load(capsys.readouterr().out)
    check(isvc)
    assert (isvc["metadata"]["name"], isvc["metadata"]["namespace"]) == ("ultrasound", "serving")
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 25
    # no --image: none in the InferenceService, so the ServingRuntime's applies (the image k8s/ names, which a
    # user pointing the kustomizations at their own registry changes there alone)
    assert "image" not in isvc["spec"]["predictor"]["model"]
    rc = main(["deploy", "--model-uri", "s3://models/sonossl/v1", "--canary-percent", "150", "--dry-run"])
    assert rc == 2 and "--canary-percent) 150" in capsys.readouterr().err
    rc = main(["deploy", "--model-uri", "s3://models/sonossl/v1", "--image", "registry.example.com/sonossl:1",
               "--dry-run"])
    assert rc == 0 and yaml.safe_load(capsys.readouterr().out)["spec"]["predictor"]["model"]["image"] == \
        "registry.example.com/sonossl:1"


def test_without_cluster_configuration_there_is_no_champion(monkeypatch, caplog):
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    with caplog.at_level(logging.INFO, logger="sonossl.deploy"):
        assert champion_metric("sonossl", "sonossl", "planes.test.macro_f1") is None
    assert "no Kubernetes configuration" in caplog.text


class FakeKubeAPI:
    """The custom-object endpoints of a Kubernetes API server for InferenceServices, in memory, on 127.0.0.1."""

    PATH = re.compile(r"/apis/serving\.kserve\.io/v1beta1/namespaces/([^/]+)/inferenceservices(?:/([^/?]+))?")

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.refuse_with: int | None = None
        self.no_kserve = False  # a cluster without KServe's CRDs: its paths answer the plain 404 page
        self.conflicts = 0  # PUTs to answer 409 first, each after a write of its own (as KServe writes status)
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict) -> None:
                send_json(self, code, body)

            def _status(self, code: int, reason: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                                  "code": code, "message": reason})

            def _handle(self, method: str) -> None:
                api.requests.append((method, self.path))
                m = api.PATH.fullmatch(self.path.split("?")[0])
                if api.no_kserve:  # kube-apiserver's answer for an API group it does not serve: no Status object
                    self.send_response(404)
                    self.send_header("Content-Type", "text/plain; charset=utf-8")
                    self.send_header("Content-Length", "19")
                    self.end_headers()
                    return self.wfile.write(b"404 page not found\n")
                if not m:
                    return self._status(404, "NotFound")
                if api.refuse_with:
                    return self._status(api.refuse_with, "Forbidden")
                ns, name = m.groups()
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
                current = api.objects.get((ns, name or (body or {}).get("metadata", {}).get("name")))
                if method == "GET":
                    return self._send(200, current) if current else self._status(404, "NotFound")
                if method == "POST":
                    if current:
                        return self._status(409, "AlreadyExists")
                    body["metadata"].update(resourceVersion="1", generation=1, namespace=ns)
                    api.objects[(ns, body["metadata"]["name"])] = body
                    return self._send(201, body)
                if method == "PUT":
                    if not current:
                        return self._status(404, "NotFound")
                    if api.conflicts:
                        api.conflicts -= 1
                        current["metadata"]["resourceVersion"] = str(int(current["metadata"]["resourceVersion"]) + 1)
                    if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                        return self._status(409, "Conflict")
                    version = int(current["metadata"]["resourceVersion"]) + 1
                    body["metadata"].update(resourceVersion=str(version), generation=version, namespace=ns)
                    api.objects[(ns, name)] = body
                    return self._send(200, body)
                return self._status(405, "MethodNotAllowed")

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}]}))
        return path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def kube_api(tmp_path, monkeypatch):
    import kubernetes.client

    saved = kubernetes.client.Configuration.get_default_copy()
    api = FakeKubeAPI()
    monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))
    yield api
    api.close()
    kubernetes.client.Configuration.set_default(saved)  # loading the kubeconfig set the client's global default


def test_deploy_creates_then_updates_and_promotes(tiny_export, s3_server, kube_api, caplog):
    from sonossl.storage import upload

    card = json.loads((tiny_export / "model_card.json").read_text())
    uri = f"s3://{s3_server.bucket}/models/{card['model_version']}"
    upload(tiny_export, uri)
    metric = "planes.test.macro_f1"
    with caplog.at_level(logging.INFO, logger="sonossl.deploy"):
        assert champion_metric("sonossl", "sonossl", metric) is None  # nothing served yet: 404
    assert "none of that name" in caplog.text

    # first deploy: the card is read from S3 next to the model, the service is created
    created = deploy(uri, canary_percent=None, **ARGS)
    assert [m for m, _ in kube_api.requests] == ["GET", "GET", "POST"]
    stored = kube_api.objects[("sonossl", "sonossl")]
    assert created["metadata"]["resourceVersion"] == "1"
    assert stored["spec"]["predictor"]["model"]["storageUri"] == uri + "/"
    check({k: v for k, v in stored.items()})
    served = champion_metric("sonossl", "sonossl", metric)
    assert served == pytest.approx(card["metrics"]["planes"]["test"]["macro_f1"])

    # someone else's annotation survives our updates; ours are replaced
    stored["metadata"]["annotations"]["team.example.com/owner"] = "imaging"
    canary = deploy(uri, canary_percent=20, **ARGS)
    assert kube_api.requests[-1][0] == "PUT" and canary["metadata"]["resourceVersion"] == "2"
    assert canary["spec"]["predictor"]["canaryTrafficPercent"] == 20
    assert canary["metadata"]["annotations"]["team.example.com/owner"] == "imaging"

    # promotion: a deploy without a canary replaces the spec, so the canary split is gone; KServe writes the object
    # (its status) twice between our read and our write: each 409 is read again and retried; its finalizer stays
    kube_api.objects[("sonossl", "sonossl")]["metadata"]["finalizers"] = ["inferenceservice.finalizers"]
    kube_api.conflicts = 2
    promoted = deploy(uri, canary_percent=None, **ARGS)
    assert "canaryTrafficPercent" not in promoted["spec"]["predictor"]
    assert promoted["metadata"]["resourceVersion"] == "5" and [m for m, _ in kube_api.requests[-6:]] == [
        "GET", "PUT", "GET", "PUT", "GET", "PUT"]
    assert promoted["metadata"]["finalizers"] == ["inferenceservice.finalizers"]
    assert promoted["metadata"]["annotations"]["team.example.com/owner"] == "imaging"
    kube_api.conflicts = 9  # a cluster that keeps changing it: a clear error after the last attempt, on one line
    with pytest.raises(DeployError) as refused:
        deploy(uri, canary_percent=None, **ARGS)
    assert str(refused.value) == ("InferenceService sonossl/sonossl: the cluster refused the update: 409 Conflict: "
                                  "Conflict")


@pytest.fixture
def pushed(tiny_export, s3_server) -> str:
    """The tiny export pushed to the local S3 server; its URI."""
    from sonossl.storage import upload

    uri = f"s3://{s3_server.bucket}/models/tiny"
    upload(tiny_export, uri)
    return uri


def test_a_refusing_cluster_gives_a_clear_error(kube_api, pushed):
    kube_api.refuse_with = 403
    refused = r"reading InferenceService sonossl/sonossl from http://127\.0\.0\.1:\d+: 403"
    with pytest.raises(DeployError, match=refused):
        deploy(pushed, canary_percent=None, **ARGS)
    with pytest.raises(DeployError, match="403"):
        champion_metric("sonossl", "sonossl", "planes.test.macro_f1")


def test_a_cluster_without_kserve_is_an_error_not_nothing_served(kube_api, pushed, capsys):
    """A 404 that is not the API's Status about the object (no InferenceService API at all) must not read as "no
    InferenceService yet": the champion gate would answer "deploy" and the failure would wait for the deploy step."""
    from sonossl.cli import main

    kube_api.no_kserve = True
    missing = (r"http://127\.0\.0\.1:\d+ has no InferenceService API \(serving\.kserve\.io/v1beta1\): is KServe "
               "installed")
    with pytest.raises(DeployError, match=missing):
        champion_metric("sonossl", "sonossl", "planes.test.macro_f1")
    assert main(["champion"]) == 2 and re.search(missing, capsys.readouterr().err)
    with pytest.raises(DeployError, match=missing + r".*404 Not Found: 404 page not found"):
        deploy(pushed, canary_percent=None, **ARGS)


def test_a_uri_with_a_card_but_no_model_is_refused_before_the_cluster(kube_api, s3_server, tiny_export):
    from sonossl.storage import upload

    uri = f"s3://{s3_server.bucket}/models/card-only"
    upload(tiny_export / "model_card.json", uri + "/model_card.json")
    with pytest.raises(DeployError, match=rf"{uri} holds a model card but no model.pt: push the whole export folder"):
        deploy(uri, canary_percent=5, **ARGS)
    assert kube_api.requests == []


def test_an_unreachable_cluster_gives_a_clear_error(kube_api, pushed):
    kube_api.close()
    with pytest.raises(DeployError, match=r"cannot reach the Kubernetes API at http://127\.0\.0\.1:\d+"):
        deploy(pushed, canary_percent=None, **ARGS)


def test_a_card_of_another_model_than_the_uri_holds_is_refused_before_the_cluster(kube_api, pushed, tiny_export):
    """The card's annotations are what the champion gate compares: a card of another export (a re-export beside
    a URI pushed earlier) would describe another model than the one served."""
    stale = {**json.loads((tiny_export / "model_card.json").read_text()), "model_version": "0123456789ab"}
    with pytest.raises(DeployError, match=rf"of model version '0123456789ab', but {pushed} holds '[0-9a-f]{{12}}'"):
        deploy(pushed, canary_percent=None, model_card=stale, **ARGS)
    assert kube_api.requests == []
    deploy(pushed, canary_percent=None, model_card=tiny_export, **ARGS)  # its own card: deployed
    assert [m for m, _ in kube_api.requests] == ["GET", "POST"]


def test_the_model_version_changes_with_the_export_parameters(tiny_export, tiny_clips, tiny_params, tmp_path):
    """Two exports of the same fine-tunes with other export parameters are other models (another PCA, so another
    served `embedding_reduced`, other drift references): they get other versions; the same parameters, the same
    version (the version ignored the export parameters)."""
    import dataclasses
    import json

    from sonossl.export import export

    finetune_dir = tiny_export.parent / "ft"
    card = json.loads((tiny_export / "model_card.json").read_text())
    same = export(tiny_clips, finetune_dir, tmp_path / "same", tiny_params, progress=False)
    fewer = dataclasses.replace(tiny_params, export=dataclasses.replace(tiny_params.export, embedding_dims=2))
    other = export(tiny_clips, finetune_dir, tmp_path / "other", fewer, progress=False)
    assert same["model_version"] == card["model_version"] != other["model_version"]


def test_the_pipeline_s_deploy_step_names_its_own_parameters_in_a_bad_argument(tiny_export):
    """sonossl deploy's checks name its options; from the pipeline's deploy step the message also says which
    pipeline parameters those are."""
    from sonossl.pipeline.steps import deploy_step

    common = dict(model_dir=tiny_export, namespace="sonossl", image=ARGS["image"], canary_percent=0,
                  service_account="sonossl-s3", runtime="sonossl", gpu=False, dry_run=True)
    with pytest.raises(ValueError, match=r"deploy step \(pipeline parameters service_name='Bad_Name', .*\): "
                                         r"name \(--name\) 'Bad_Name' is not a valid InferenceService name"):
        deploy_step(model_store="s3://models/sonossl", name="Bad_Name", **common)
    with pytest.raises(ValueError, match=r"model_store='s3://Bad_Bucket/m'.*'Bad_Bucket' is not a valid S3 bucket"):
        deploy_step(model_store="s3://Bad_Bucket/m", name="sonossl", **common)
    isvc = json.loads(deploy_step(model_store="s3://models/sonossl", name="sonossl", **common))
    assert isvc["spec"]["predictor"]["model"]["image"] == ARGS["image"]  # the pipeline's image: served = trained
