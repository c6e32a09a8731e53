"""Kubeflow pipelines: the compiled YAML (golden copy, deterministic, the same as the kfp SDK's own CLI gives), the
cluster settings in it (GPU, /dev/shm, S3 secret, retries, image tag, deploy gate), `sonossl pipeline submit`
errors against real local servers, dataset locations (S3 on a local S3 server, DVC revision), and a full kfp.local
run of the training pipeline on tiny whose metrics match a `dvc repro` of the same stages."""

from __future__ import annotations

import dataclasses
import http.server
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import send_json
from sonossl import __version__

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "pipelines" / "golden"
SONOSSL = [sys.executable, "-m", "sonossl.cli"]
KFP = str(Path(sys.executable).parent / "kfp")
# Metrics are written rounded to 4 decimals; a kfp.local run and `dvc repro` run the same code on the same data
# with the same seeds, so they must agree to that rounding (on this CPU they are identical: see the test).
TOLERANCE = 1e-4


def _run(*args: str, cwd: Path = REPO, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _docs(path: Path) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform


# ------------------------------------------------------------------------------------------------ compile


def test_compile_is_deterministic_and_matches_the_golden_yaml(tmp_path):
    from sonossl.pipeline.spec import compile_pipelines

    first = _run(*SONOSSL, "pipeline", "compile", "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    compile_pipelines(tmp_path / "b")  # again, in this process
    for name in ("training", "monitoring", "crossval"):
        a, b = (tmp_path / "a" / f"{name}.yaml").read_bytes(), (tmp_path / "b" / f"{name}.yaml").read_bytes()
        assert a == b, f"{name}: two compiles differ"
        assert a == (GOLDEN / f"{name}.yaml").read_bytes(), (
            f"pipelines/golden/{name}.yaml is stale: if the change is intended, run "
            "`sonossl pipeline compile --out pipelines/golden` and commit the result")


@pytest.mark.parametrize("name", ["training", "monitoring", "crossval"])
def test_the_kfp_sdk_cli_compiles_the_same_yaml(tmp_path, name):
    """Users who know Kubeflow compile with kfp's own CLI, from the repository root."""
    out = tmp_path / f"{name}.yaml"
    proc = _run(KFP, "dsl", "compile", "--py", f"pipelines/{name}.py", "--output", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.read_bytes() == (GOLDEN / f"{name}.yaml").read_bytes()


def test_training_yaml_carries_the_cluster_settings():
    spec, platform = _docs(GOLDEN / "training.yaml")
    executors = spec["deploymentSpec"]["executors"]
    tasks = spec["root"]["dag"]["tasks"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) >= {"dataset", "test_dataset", "tasks", "profile", "pretrain_epochs", "pretrain_lr",
                           "finetune_epochs", "finetune_lr", "image", "gpu_image", "deploy_metric",
                           "deploy_dry_run", "checkpoint_store"}
    assert params["checkpoint_store"]["defaultValue"] == ""  # no mirror: a retry starts over
    assert params["test_dataset"]["defaultValue"] == ""  # optional: the test split of dataset
    assert params["tasks"] == {"defaultValue": ["planes", "saliency"], "isOptional": True, "parameterType": "LIST"}
    assert params["image"]["defaultValue"] == f"ghcr.io/sonossl/sonossl:{__version__}"
    assert params["gpu_image"]["defaultValue"] == f"ghcr.io/sonossl/sonossl:{__version__}-cuda"
    assert "defaultValue" not in params["dataset"]  # required

    # the project image, a run parameter, whole (the KFP driver resolves a parameter in an image only as the whole
    # string); its CUDA build for the GPU steps; lightweight components with nothing installed at run time
    gpu_executors = {"exec-pretrain", "exec-finetune", "exec-finetune-2"}
    for name, ex in executors.items():
        param = "gpu_image" if name in gpu_executors else "image"
        assert ex["container"]["image"] == f"{{{{$.inputs.parameters['pipelinechannel--{param}']}}}}", name
        assert "pip install" not in " ".join(ex["container"]["command"]), name
    components = spec["components"]
    assert {c.removeprefix("comp-").split("-")[0] for c in components} >= {
        "preprocess", "pretrain", "finetune", "evaluate", "export", "champion", "deploy"}
    # every CPU step requests CPU and memory (none runs BestEffort, the first evicted), the GPU steps their own
    from sonossl.kubeflow.components import CPU_REQUESTS

    kinds = {"exec-preprocess": "preprocess", "exec-preprocess-test": "preprocess", "exec-evaluate": "evaluate",
             "exec-export": "export", "exec-champion": "control", "exec-deploy": "control"}
    for name, kind in kinds.items():
        resources = executors[name]["container"]["resources"]
        cpu, memory = CPU_REQUESTS[kind]
        assert (resources["resourceCpuRequest"], resources["resourceMemoryRequest"]) == (cpu, memory), name
    assert all("resources" in ex["container"] for ex in executors.values())

    # the fine-tunes: one loop over `tasks` from the SSL encoder, one from scratch; evaluate and export collect both
    loops = {tasks[t]["taskInfo"]["name"]: t for t in tasks if t.startswith("for-loop")}
    assert sorted(loops) == ["scratch-finetunes", "ssl-finetunes"]
    finetunes = {}
    for init, loop in loops.items():
        assert tasks[loop]["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--tasks"}
        (ft,) = components[f"comp-{loop}"]["dag"]["tasks"].values()
        finetunes[init.split("-")[0]] = ft
        assert ft["inputs"]["parameters"]["task"] == {"componentInputParameter": "pipelinechannel--tasks-loop-item"}
        assert ft["inputs"]["parameters"]["name"]["runtimeValue"]["constant"] == \
            f"{init.split('-')[0]}-{{{{$.inputs.parameters['pipelinechannel--tasks-loop-item']}}}}"
    for consumer in ("evaluate", "export"):
        assert {tasks[consumer]["inputs"]["artifacts"][init]["taskOutputArtifact"]["producerTask"]
                for init in ("ssl", "scratch")} == set(loops.values())
        assert components[f"comp-{consumer}"]["inputDefinitions"]["artifacts"]["ssl"]["isArtifactList"] is True

    # GPU steps: accelerator, the GPU pools' taint tolerated, CPU and memory requested (not BestEffort) with a
    # limit above the memory-backed /dev/shm, S3 secret as env, retries
    gpu_tasks = {"pretrain": tasks["pretrain"], **finetunes}
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert {t["componentRef"]["name"].replace("comp-", "exec-") for t in gpu_tasks.values()} == gpu_executors
    for name, t in gpu_tasks.items():
        ex = t["componentRef"]["name"].replace("comp-", "exec-")
        res = executors[ex]["container"]["resources"]
        assert res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "1"
        assert (res["resourceCpuRequest"], res["resourceMemoryRequest"], res["resourceMemoryLimit"]) == \
            ("8", "32Gi", "64Gi")
        assert k8s[ex]["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
        assert {"mountPath": "/dev/shm", "medium": "Memory", "volumeName": "dshm", "sizeLimit": "16Gi"} \
            in k8s[ex]["emptyDirMounts"]
        env, optional = k8s[ex]["secretAsEnv"]  # the keys, and the endpoint and region a Secret may leave out
        assert env["secretName"] == optional["secretName"] == "sonossl-s3"
        assert {"envVar": "AWS_ACCESS_KEY_ID", "secretKey": "AWS_ACCESS_KEY_ID"} in env["keyToEnv"]
        assert not env["optional"] and optional["optional"]
        assert {"envVar": "AWS_ENDPOINT_URL", "secretKey": "AWS_ENDPOINT_URL"} in optional["keyToEnv"]
        assert t["retryPolicy"]["maxRetryCount"] == 2, name
        assert "checkpoint_store" in t["inputs"]["parameters"], name  # mirrored there, so that a retry resumes
    # SSL and scratch fine-tuning run in parallel: the scratch runs wait for nothing but the data
    assert "encoder" in finetunes["ssl"]["inputs"]["artifacts"]
    assert "encoder" not in finetunes["scratch"]["inputs"]["artifacts"]
    assert tasks[loops["scratch-finetunes"]]["dependentTasks"] == ["preprocess", "preprocess-test"]
    assert tasks[loops["ssl-finetunes"]]["dependentTasks"] == ["preprocess", "preprocess-test", "pretrain"]

    # caching keys on the data: preprocess always runs and its version id feeds every later step
    assert tasks["preprocess"]["cachingOptions"] == {}  # enableCache false is left out of the IR
    for t in ("pretrain", "export"):
        assert tasks[t]["inputs"]["parameters"]["data_version"]["taskOutputParameter"] == {
            "outputParameterKey": "Output", "producerTask": "preprocess"}
    for loop in loops.values():
        assert tasks[loop]["inputs"]["parameters"]["pipelinechannel--preprocess-Output"]["taskOutputParameter"] == {
            "outputParameterKey": "Output", "producerTask": "preprocess"}
    # and so does the test set's, into every fine-tune run (which it scores)
    assert tasks["preprocess-test"]["cachingOptions"] == {}
    assert tasks["preprocess-test"]["inputs"]["parameters"]["dataset"]["componentInputParameter"] == "test_dataset"
    for t in ("preprocess", "preprocess-test"):  # saliency asked of data without gaze maps fails here, early
        assert tasks[t]["inputs"]["parameters"]["tasks"] == {"componentInputParameter": "tasks"}
    for init, ft in finetunes.items():
        inputs = ft["inputs"]
        assert inputs["parameters"]["data_version"] == {"componentInputParameter": "pipelinechannel--preprocess-Output"}
        assert inputs["parameters"]["test_data_version"] == {
            "componentInputParameter": "pipelinechannel--preprocess-test-Output"}
        assert inputs["artifacts"]["test_clips"] == {"componentInputArtifact": "pipelinechannel--preprocess-test-clips"}
        assert tasks[loops[f"{init}-finetunes"]]["inputs"]["artifacts"]["pipelinechannel--preprocess-test-clips"] == {
            "taskOutputArtifact": {"outputArtifactKey": "clips", "producerTask": "preprocess-test"}}

    # deploy only when the champion gate says so
    (cond,) = [t for t in tasks.values() if t["taskInfo"]["name"] == "beats-champion"]
    assert cond["triggerPolicy"]["condition"] == \
        "inputs.parameter_values['pipelinechannel--champion-Output'] == 'deploy'"
    assert "deploy" in components[cond["componentRef"]["name"]]["dag"]["tasks"]


def test_crossval_yaml_runs_preprocess_then_crossval_on_a_gpu():
    spec, platform = _docs(GOLDEN / "crossval.yaml")
    tasks = spec["root"]["dag"]["tasks"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {"dataset", "profile", "pretrain_epochs", "folds", "checkpoint_store", "image",
                           "gpu_image"}
    assert params["checkpoint_store"]["defaultValue"] == ""
    assert tasks["crossval"]["inputs"]["parameters"]["checkpoint_store"] == {
        "componentInputParameter": "checkpoint_store"}
    assert "defaultValue" not in params["dataset"] and params["profile"]["defaultValue"] == "default"
    assert sorted(tasks) == ["crossval", "preprocess"]
    assert tasks["preprocess"]["inputs"]["parameters"]["tasks"]["runtimeValue"]["constant"] == ["planes"]
    assert tasks["preprocess"]["cachingOptions"] == {}  # always runs; its version id keys crossval's cache
    assert tasks["crossval"]["inputs"]["parameters"]["data_version"]["taskOutputParameter"] == {
        "outputParameterKey": "Output", "producerTask": "preprocess"}
    ex = "exec-crossval"
    container = spec["deploymentSpec"]["executors"][ex]["container"]
    assert container["image"] == "{{$.inputs.parameters['pipelinechannel--gpu_image']}}"
    assert spec["deploymentSpec"]["executors"]["exec-preprocess"]["container"]["image"] == \
        "{{$.inputs.parameters['pipelinechannel--image']}}"
    res = container["resources"]
    assert res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["resourceMemoryLimit"] == "64Gi"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][ex]
    assert k8s["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert k8s["secretAsEnv"][0]["secretName"] == "sonossl-s3"
    assert k8s["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
    assert tasks["crossval"]["retryPolicy"]["maxRetryCount"] == 2


def test_compile_overrides_defaults_and_rejects_unknown_parameters(tmp_path):
    proc = _run(*SONOSSL, "pipeline", "compile", "--out", str(tmp_path), "--param", "image=ghcr.io/sonossl/sonossl:0.9.1",
                "--param", "profile=gpu")
    assert proc.returncode == 0, proc.stderr
    spec, _ = _docs(tmp_path / "training.yaml")
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["image"]["defaultValue"] == "ghcr.io/sonossl/sonossl:0.9.1"
    assert params["profile"]["defaultValue"] == "gpu"
    mon, _ = _docs(tmp_path / "monitoring.yaml")
    assert mon["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"] == "ghcr.io/sonossl/sonossl:0.9.1"
    # the drift step is no BestEffort pod either: it asks what the drift CronJob in k8s/ asks
    from sonossl.kubeflow.components import CPU_REQUESTS

    res = mon["deploymentSpec"]["executors"]["exec-drift"]["container"]["resources"]
    assert (res["resourceCpuRequest"], res["resourceMemoryRequest"]) == CPU_REQUESTS["drift"] == ("1", "2Gi")

    proc = _run(*SONOSSL, "pipeline", "compile", "--out", str(tmp_path / "x"), "--param", "epochs=3")
    assert proc.returncode == 2 and "has parameter(s) ['epochs']" in proc.stderr, proc.stderr
    assert not (tmp_path / "x").exists()
    # from Python, values of the declared types work as the same text does
    from sonossl.pipeline.spec import compile_pipeline

    compile_pipeline("training", tmp_path / "py.yaml", {"tasks": ["planes"], "serve_gpu": True, "pretrain_epochs": 3})
    params = _docs(tmp_path / "py.yaml")[0]["root"]["inputDefinitions"]["parameters"]
    assert (params["tasks"]["defaultValue"], params["serve_gpu"]["defaultValue"]) == (["planes"], True)
    assert params["pretrain_epochs"]["defaultValue"] == 3


def test_a_gpu_step_given_a_gpu_its_torch_cannot_use_fails_at_once(monkeypatch, tmp_path):
    """The CPU image on a GPU node would train the gpu profile on the node's CPUs: the device plugin's
    NVIDIA_VISIBLE_DEVICES says a GPU was given, so the step stops, naming the CUDA image; without it (kfp.local,
    a CPU node) nothing is checked. The deploy step serves a GPU model with the CUDA image too."""
    import torch

    from sonossl.kubeflow.components.deploy import deploy
    from sonossl.pipeline import GPU_IMAGE, IMAGE
    from sonossl.pipeline.steps import require_usable_gpu

    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    require_usable_gpu()
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "void")
    require_usable_gpu()
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "GPU-0e1f")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=rf"given a GPU \(NVIDIA_VISIBLE_DEVICES=GPU-0e1f\).*{GPU_IMAGE}"):
        require_usable_gpu()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    require_usable_gpu()

    chosen = []
    monkeypatch.setattr("sonossl.pipeline.steps.deploy_step", lambda *args: chosen.append(args[4]) or "{}")
    model = type("Model", (), {"path": str(tmp_path)})()
    for gpu, gpu_image in [(False, ""), (True, ""), (True, "registry.example.org/sonossl:1-cuda")]:
        deploy.python_func(model=model, model_store="s3://m", name="s", namespace="n", image=IMAGE,
                           service_account="a", runtime="r", gpu=gpu, gpu_image=gpu_image)
    assert chosen == [IMAGE, GPU_IMAGE, "registry.example.org/sonossl:1-cuda"]


# ------------------------------------------------------------------------------------------------- submit


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_submit_to_an_unreachable_host_fails_fast_with_one_clear_line():
    port = _closed_port()
    t0 = time.monotonic()
    proc = _run(*SONOSSL, "pipeline", "submit", "--host", f"http://127.0.0.1:{port}",
                "--param", "dataset=s3://datasets/raw/sim", timeout=60)
    assert proc.returncode == 1
    assert time.monotonic() - t0 < 30
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"sonossl pipeline submit: error: cannot reach the Kubeflow Pipelines API at "
                                f"http://127.0.0.1:{port}"), proc.stderr
    assert "Traceback" not in proc.stderr


class _Rejecting(http.server.BaseHTTPRequestHandler):
    """An API that rejects every request with ``status`` (or lets the health check through, as an RBAC proxy in
    front of the pipelines API can, so that kfp.Client's own request is the one refused)."""

    status = 401
    healthz_open = False
    seen: list[str] = []

    def do_GET(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).seen.append(f"{self.command} {self.path.split('?')[0]} {self.headers.get('Authorization')}")
        ok = self.healthz_open and self.path == "/apis/v2beta1/healthz"
        self.send_response(200 if ok else self.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"multi_user": false}' if ok else b'{"error": "unauthorized"}')

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,token,healthz_open", [(401, None, False), (403, "expired-token", False),
                                                       (403, "expired-token", True)])
def test_submit_to_a_host_that_rejects_the_credentials(status, token, healthz_open):
    handler = type("Handler", (_Rejecting,), {"status": status, "seen": [], "healthz_open": healthz_open})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"http://127.0.0.1:{server.server_address[1]}"
        args = ["--token", token] if token else []
        proc = _run(*SONOSSL, "pipeline", "submit", "--host", host, "--param", "dataset=s3://d/raw", *args)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 1
    assert f"rejected the credentials (HTTP {status}" in proc.stderr and "--token" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    auth = f"Bearer {token}" if token else None
    assert handler.seen[0] == f"GET /apis/v2beta1/healthz {auth}"
    if healthz_open:  # then kfp.Client asked for the experiment, with the token, and was refused
        assert handler.seen[-1] == f"GET /apis/v2beta1/experiments {auth}"
        assert all(seen.endswith(auth) for seen in handler.seen)
    else:
        assert len(handler.seen) == 1


class _Accepting(http.server.BaseHTTPRequestHandler):
    """The part of the Kubeflow Pipelines v2beta1 API that a run submission uses: health, experiments (none yet, so
    one is created) and runs; it keeps what it was sent."""

    requests: list[tuple[str, str, dict | None]] = []

    def do_GET(self):  # noqa: N802
        path = self.path.split("?")[0]
        type(self).requests.append(("GET", path, None))
        answers = {"/apis/v2beta1/healthz": {"multi_user": False}, "/apis/v2beta1/experiments": {}}
        send_json(self, 200 if path in answers else 404, answers.get(path, {"error": "not found"}))

    def do_POST(self):  # noqa: N802
        path = self.path.split("?")[0]
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        type(self).requests.append(("POST", path, body))
        if path == "/apis/v2beta1/experiments":
            send_json(self, 200, {"experiment_id": "exp-1", "display_name": body["display_name"]})
        elif path == "/apis/v2beta1/runs":
            send_json(self, 200, {"run_id": "run-1", "experiment_id": body["experiment_id"]})
        else:
            send_json(self, 404, {"error": "not found"})

    def log_message(self, *args):
        pass


def test_submit_sends_the_compiled_pipeline_and_typed_parameters():
    """A run reaches the API with the training pipeline's spec and the parameters as their types (a list for
    tasks, an int for epochs); stdout holds only the JSON answer (kfp.Client's own lines go to stderr)."""
    handler = type("Handler", (_Accepting,), {"requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"http://127.0.0.1:{server.server_address[1]}"
        proc = _run(*SONOSSL, "pipeline", "submit", "--host", host, "--param", "dataset=s3://lungs/raw",
                    "--param", "tasks=planes", "--param", "pretrain_epochs=3", "--experiment", "lungs")
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"run_id": "run-1", "experiment": "lungs",
                                       "url": f"{host}/#/runs/details/run-1"}
    posts = {path: body for method, path, body in handler.requests if method == "POST"}
    assert posts["/apis/v2beta1/experiments"]["display_name"] == "lungs"
    run = posts["/apis/v2beta1/runs"]
    assert run["experiment_id"] == "exp-1"
    assert run["runtime_config"]["parameters"] == {"dataset": "s3://lungs/raw", "tasks": ["planes"],
                                                   "pretrain_epochs": 3}
    golden, _ = _docs(GOLDEN / "training.yaml")
    sent = run["pipeline_spec"]["pipeline_spec"]
    assert sent["pipelineInfo"]["name"] == "sonossl-training" and sent["root"] == golden["root"]


def test_submit_checks_parameters_before_any_network_call():
    proc = _run(*SONOSSL, "pipeline", "submit", "--host", f"http://127.0.0.1:{_closed_port()}",
                "--param", "epochs=3")
    assert proc.returncode == 2 and "no parameter 'epochs'" in proc.stderr and "pretrain_epochs" in proc.stderr
    proc = _run(*SONOSSL, "pipeline", "submit", "--host", "http://127.0.0.1:1", "--param", "pretrain_epochs=many")
    assert proc.returncode == 2 and "pretrain_epochs=many: expected int" in proc.stderr
    # a folder of this machine, which the cluster's pods cannot read: refused before anything is sent
    for args, key, forms in [
            (["--param", "dataset=data/raw/sim"], "dataset='data/raw/sim'", "s3:// or dvc://"),
            (["--param", "dataset=s3://d/raw", "--param", "checkpoint_store=ckpt"], "checkpoint_store='ckpt'",
             "s3://"),
            (["--pipeline", "monitoring", "--param", "request_log=logs/requests"], "request_log='logs/requests'",
             "s3://"),
            (["--pipeline", "monitoring", "--param", "request_log=s3://l/r", "--param", "reports=reports/drift"],
             "reports='reports/drift'", "s3://")]:
        proc = _run(*SONOSSL, "pipeline", "submit", "--host", f"http://127.0.0.1:{_closed_port()}", *args)
        assert proc.returncode == 2 and f"pipeline parameter {key}: a cluster run reaches {forms} locations" \
            in proc.stderr, proc.stderr

    # what would fail only on the cluster, some of it after all the training: refused before any network call
    from sonossl.pipeline.submit import submit

    host = f"http://127.0.0.1:{_closed_port()}"
    dvc = "pipeline parameter dataset='dvc://data/raw/sim{}': a pod has no git checkout of its own"
    for pipeline, params, message in [
            ("training", {}, "the training pipeline needs --param dataset=... (it has no default)"),
            ("training", {"dataset": ""}, "the training pipeline needs --param dataset="),
            ("crossval", {"profile": "tiny"}, "the crossval pipeline needs --param dataset="),
            ("monitoring", {"reports": "s3://r/drift"}, "the monitoring pipeline needs --param request_log="),
            ("training", {"dataset": "dvc://data/raw/sim"}, dvc.format("")),
            ("training", {"dataset": "dvc://data/raw/sim?repo=/home/me/sonossl"}, dvc.format("?repo=/home/me/sonossl")),
            ("training", {"dataset": "s3://d/raw", "profile": "gpuu"}, "--param profile=gpuu: not a profile of "
                                                                       "params.yaml (tiny, default, gpu)"),
            ("training", {"dataset": "s3://d/raw", "canary_percent": "250"}, "--param canary_percent=250: give a "
                                                                              "whole percentage 0-100"),
            ("training", {"dataset": "s3://d/raw", "service_name": "Lung_Model"}, "--param service_name=Lung_Model: "
                                                                                 "not a valid InferenceService name"),
            ("monitoring", {"request_log": "s3://l/r", "namespace": "my ns"}, "--param namespace=my ns: not a valid "
                                                                              "namespace"),
            ("training", {"dataset": "s3://d/raw", "model_store": "s3://Bad_Bucket/x"},
             "--param model_store=s3://Bad_Bucket/x: 'Bad_Bucket' is not a valid S3 bucket name"),
            ("training", {"dataset": "s3://d/raw", "image": ""}, "--param image=: not a container image reference"),
            ("training", {"dataset": "s3://d/raw", "gpu_image": "Reg/Sonossl:1-cuda"},
             "--param gpu_image=Reg/Sonossl:1-cuda: not a container image reference")]:
        with pytest.raises(ValueError) as err:
            submit(host, pipeline, params, schedule="0 6 * * *" if pipeline == "monitoring" else None)
        assert message in str(err.value), (params, str(err.value))
    from sonossl.pipeline.spec import typed_parameters

    # a whole bucket is a model store (the deploy step uploads to <store>/<model version>)
    assert typed_parameters("training", {"dataset": "s3://d/raw", "model_store": "s3://models"})["model_store"] == \
        "s3://models"
    # a dvc:// location with a repository a pod can clone passes these checks and reaches the host check
    with pytest.raises(Exception, match="cannot reach the Kubeflow Pipelines API"):
        submit(host, "training", {"dataset": "dvc://data/raw/sim?repo=https://github.com/org/sonossl.git&rev=v1"})


# ------------------------------------------------------------------------------------------ steps, datasets


def test_deploy_gate_and_metric_names():
    from sonossl.pipeline.steps import card_metric, deploy_decision

    assert deploy_decision(0.5, None) == "deploy"  # nothing served yet
    assert deploy_decision(0.51, 0.5) == "deploy"
    assert deploy_decision(0.5, 0.5) == "keep" and deploy_decision(0.4, 0.5) == "keep"
    card = {"model_version": "abc", "metrics": {"planes": {"val": {"macro_f1": 0.5}, "test": {"macro_f1": 0.25}},
                                                "saliency": {"val": {"cc": 0.2, "kld": 1.2},
                                                             "test": {"cc": 0.1, "n": 15}}}}
    assert card_metric(card, "planes.val.macro_f1") == 0.5 and card_metric(card, "saliency.val.cc") == 0.2
    with pytest.raises(ValueError, match=r"'planes.val.accuracy' is not in the model card; valid metrics are "
                                         r"\['planes.test.macro_f1', 'planes.val.macro_f1', 'saliency.test.cc', "
                                         r"'saliency.val.cc', 'saliency.val.kld'\]"):
        card_metric(card, "planes.val.accuracy")
    # a test score would choose the model on the test videos; KLD is lower-is-better, and the gate keeps the higher
    for metric in ("planes.test.macro_f1", "saliency.val.kld", "planes.val.f1", "macro_f1"):
        with pytest.raises(ValueError, match=rf"deploy metric '{metric}': give <task>.val.<metric>"):
            card_metric(card, metric)
    from sonossl.pipeline.spec import typed_parameters

    assert typed_parameters("training", {"deploy_metric": "saliency.val.cc"}) == {"deploy_metric": "saliency.val.cc"}
    with pytest.raises(ValueError, match="deploy metric 'planes.test.macro_f1'"):  # before anything is submitted
        typed_parameters("training", {"deploy_metric": "planes.test.macro_f1"})


def test_the_finetune_step_scores_the_pipeline_s_test_set(tiny_clips, tiny_test_clips, tmp_path, monkeypatch):
    """preprocess-test with no test_dataset leaves a marker, and the finetune step then scores the test split of its
    clips; given a test clip dataset, it scores all of it. Training is the same either way."""
    from sonossl.pipeline.steps import NO_TEST_SET, PARAMS_ENV, finetune_step, preprocess_test_step

    monkeypatch.setenv(PARAMS_ENV, str(REPO / "params.yaml"))
    none = tmp_path / "no-test-set"
    assert preprocess_test_step("", none, "tiny") == "" and [p.name for p in none.iterdir()] == [NO_TEST_SET]
    scores, metrics = {}, {}
    for name, test in (("split", none), ("independent", tiny_test_clips), ("default", None)):
        scores[name] = finetune_step(tiny_clips, tmp_path / name, "tiny", "planes", "scratch-planes", epochs=1,
                                     test_clips=test)
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    test_version = json.loads((tiny_test_clips / "meta.json").read_text())["version"]
    assert metrics["split"]["test_set"]["split"] == metrics["default"]["test_set"]["split"] == "test"
    assert metrics["independent"]["test_set"]["split"] == "all"
    assert metrics["independent"]["test_set"]["data_version"] == test_version
    val = {name: {k: v for k, v in s.items() if ".val." in k} for name, s in scores.items()}
    assert val["split"] == val["independent"] == val["default"] and val["split"]
    assert scores["split"] == scores["default"] != scores["independent"]


def test_dataset_locations_are_parsed_and_checked(tmp_path):
    from sonossl.pipeline.dataset import fetch_raw_dataset, parse_dvc_location

    loc = parse_dvc_location("dvc://data/raw/sim?repo=https://github.com/o/r.git&rev=v1.2")
    assert (loc.path, loc.repo, loc.rev) == ("data/raw/sim", "https://github.com/o/r.git", "v1.2")
    assert parse_dvc_location("dvc://data/raw/sim").rev is None
    with pytest.raises(ValueError, match="unknown key"):
        parse_dvc_location("dvc://data/raw/sim?branch=main")
    with pytest.raises(ValueError, match="unsupported scheme"):
        fetch_raw_dataset("gs://bucket/raw", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        fetch_raw_dataset(str(tmp_path), tmp_path / "x")


def test_an_s3_dataset_is_fetched_from_a_local_s3_server(tiny_clips, s3_server, tmp_path):
    from sonossl.pipeline.dataset import fetch_raw_dataset
    from sonossl.storage import upload

    raw = tiny_clips.parent / "raw"  # the simulated sweeps the tiny clip dataset was made from
    upload(raw, f"s3://{s3_server.bucket}/raw/sim")
    got = fetch_raw_dataset(f"s3://{s3_server.bucket}/raw/sim", tmp_path / "raw")
    files = sorted(p.relative_to(raw) for p in raw.rglob("*") if p.is_file())
    assert files and sorted(p.relative_to(got) for p in got.rglob("*") if p.is_file()) == files
    assert all((got / f).read_bytes() == (raw / f).read_bytes() for f in files)


# ---------------------------------------------------------------------------------- kfp.local vs dvc repro


def _close(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys differ"
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, abs_tol=TOLERANCE), f"{where}: {a} (kfp) != {b} (dvc)"
    else:
        assert a == b, f"{where}: {a!r} (kfp) != {b!r} (dvc)"


def _scores(run: dict) -> dict:
    return {k: run[k] for k in ("name", "fraction", "videos", "frames", "val", "test")}


@pytest.mark.slow
def test_run_local_runs_the_training_pipeline_and_matches_dvc_repro(tmp_path):
    """`dvc repro` of the main line in a temporary repository, committed; then `sonossl pipeline run-local` with the
    raw data, and the independent test sweeps, read from that repository's HEAD through dvc:// locations. Both call
    the same library steps: the clip dataset versions, pretext accuracy and every fine-tune run's validation and
    test scores must match."""
    from test_dvc_pipeline import _dvc, _tiny_sim_repo

    root = _tiny_sim_repo(tmp_path)
    stages = ("finetune@ssl-planes", "finetune@ssl-saliency", "scratch@planes", "scratch@saliency")
    _dvc(root, "repro", *stages)
    git = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "add", "-A"], ["git", "commit", "-q", "-m", "tiny"]):
        subprocess.run(cmd, cwd=root, check=True, env={**os.environ, **git}, capture_output=True)

    out = tmp_path / "kfp"
    t0 = time.monotonic()
    proc = _run(*SONOSSL, "pipeline", "run-local", "--params", str(root / "params.yaml"), "--profile", "tiny",
                "--out", str(out), "--dataset", f"dvc://data/raw/sim?repo={root}&rev=HEAD", "--param",
                f"test_dataset=dvc://data/raw/sim_test?repo={root}&rev=HEAD", cwd=tmp_path, timeout=900)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads(proc.stdout)  # stdout holds the summary alone: kfp's task logs go to stderr
    run = Path(summary["run"])
    print(f"kfp.local run of the training pipeline on tiny: {seconds:.0f} s")

    # the whole graph ran: the two datasets, 5 training tasks (4 in the two loops over tasks), evaluate, export,
    # the gate and (dry-run) deploy
    assert sorted(p.name for p in run.iterdir()) == [
        "champion", "deploy", "evaluate", "export", "for-loop-1-iteration-0", "for-loop-1-iteration-1",
        "for-loop-2-iteration-0", "for-loop-2-iteration-1", "preprocess", "preprocess-test", "pretrain"]
    finetunes = sorted(run.glob("for-loop-*/finetune*"))
    assert len(finetunes) == 4
    meta = json.loads((root / "data/clips/sim/meta.json").read_text())
    test_meta = json.loads((root / "data/clips/sim_test/meta.json").read_text())
    assert summary["feature_version"] == meta["version"]
    assert json.loads((run / "preprocess/clips/meta.json").read_text())["version"] == meta["version"]
    assert json.loads((run / "preprocess-test/clips/meta.json").read_text())["version"] == test_meta["version"]

    dvc_pt = json.loads((root / "models/pretrain/both-sequential/metrics.json").read_text())
    kfp_pt = json.loads((run / "pretrain/encoder/metrics.json").read_text())
    _close(kfp_pt["val"], dvc_pt["val"], "pretrain val")
    logged = json.loads((run / "pretrain/executor_output.json").read_text())["artifacts"]["metrics"]
    assert logged["artifacts"][0]["metadata"]["val.order_acc"] == kfp_pt["val"]["order_acc"]  # via log_metric

    names = {}
    for task in finetunes:
        kfp_ft = json.loads((task / "model/metrics.json").read_text())
        name = kfp_ft["name"]
        names[name] = task
        dvc_ft = json.loads((root / "models/finetune" / name / "metrics.json").read_text())
        assert [r["name"] for r in kfp_ft["runs"]] == [r["name"] for r in dvc_ft["runs"]], name
        for k, d in zip(kfp_ft["runs"], dvc_ft["runs"]):
            _close(_scores(k), _scores(d), f"{name} {k['name']}")
        assert kfp_ft["selected"] == dvc_ft["selected"], name
        for ts in (kfp_ft["test_set"], dvc_ft["test_set"]):
            assert ts["split"] == "all" and ts["data_version"] == test_meta["version"], name
    assert sorted(names) == ["scratch-planes", "scratch-saliency", "ssl-planes", "ssl-saliency"]

    # the exported model, the report, and the gate: no cluster, no champion -> deploy (rendered only)
    card = json.loads((Path(summary["model"]) / "model_card.json").read_text())
    assert card["model_version"] == summary["model_version"] and card["data"]["feature_version"] == meta["version"]
    assert "| SSL (both-sequential) |" in Path(summary["report"]).read_text()
    assert summary["metrics"]["planes.test.macro_f1"] == card["metrics"]["planes"]["test"]["macro_f1"]
    assert summary["deploy"] == "deploy"
    isvc = summary["inference_service"]
    assert isvc == {"name": "sonossl", "namespace": "sonossl", "dry_run": True,
                    "storageUri": f"s3://sonossl/models/export/{card['model_version']}/"}
    rendered = json.loads(json.loads((run / "deploy/executor_output.json").read_text())["parameterValues"]["Output"])
    assert rendered["metadata"]["annotations"]["sonossl.io/planes.test.macro_f1"] == \
        format(card["metrics"]["planes"]["test"]["macro_f1"], ".6g")


def test_run_local_renders_the_simulated_data_again_only_for_other_parameters(tmp_path):
    """``run-local`` keeps an earlier rendering in its --out folder; one made for another profile (other simulator
    parameters) used to be reused, so a default-profile run trained on the tiny profile's sweeps."""
    from sonossl.config import SimulateParams
    from sonossl.pipeline.local import _simulated_dataset

    small = SimulateParams(videos=1, seconds=0.5, fps=8.0, height=64, beams=32, samples=64, saliency_size=8, workers=1)
    raw = _simulated_dataset(tmp_path / "raw", small)
    first = (raw / "labels.csv").stat().st_mtime_ns
    _simulated_dataset(raw, dataclasses.replace(small, workers=2))  # how fast, not what: kept
    assert (raw / "labels.csv").stat().st_mtime_ns == first
    _simulated_dataset(raw, dataclasses.replace(small, videos=2))
    assert len((raw / "labels.csv").read_text().splitlines()) == 3  # header and two sweeps: rendered again
    assert json.loads((raw / "simulator.json").read_text())["params"]["videos"] == 2


def test_the_tasks_parameter_is_checked_before_a_run():
    from sonossl.pipeline.spec import typed_parameters

    assert typed_parameters("training", {"tasks": "planes"}) == {"tasks": ["planes"]}
    assert typed_parameters("training", {"tasks": '["planes", "saliency"]'}) == {"tasks": ["planes", "saliency"]}
    assert typed_parameters("training", {"tasks": " planes , saliency"}) == {"tasks": ["planes", "saliency"]}
    for text, error in [("saliency", "planes is missing"), ("planes,planes", "a task is named twice"),
                        ("planes,segmentation", r"unknown task\(s\) \['segmentation'\]"),
                        ("[1]", "expected a list of task names"), ('["planes"', "expected a list, as JSON or")]:
        with pytest.raises(ValueError, match=error):
            typed_parameters("training", {"tasks": text})
    proc = _run(*SONOSSL, "pipeline", "submit", "--host", f"http://127.0.0.1:{_closed_port()}",
                "--param", "dataset=s3://d/raw", "--param", "tasks=saliency")
    assert proc.returncode == 2 and "tasks=['saliency']: planes is missing" in proc.stderr, proc.stderr


def test_collected_finetune_outputs_are_named_by_their_metrics(tmp_path):
    """evaluate and export receive the loops' outputs as a list, in any order: each is keyed by the name it
    recorded; an unfinished output or two of one name fail, naming the folders."""
    from sonossl.pipeline.steps import runs_by_name

    for folder, name in [("a", "scratch-planes"), ("b", "ssl-planes"), ("c", "ssl-planes")]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "metrics.json").write_text(json.dumps({"name": name, "runs": []}))
    assert runs_by_name([tmp_path / "b", tmp_path / "a"]) == {"ssl-planes": tmp_path / "b",
                                                             "scratch-planes": tmp_path / "a"}
    with pytest.raises(ValueError, match=r"/c and .*/b: two finetune outputs named 'ssl-planes'"):
        runs_by_name([tmp_path / "b", tmp_path / "c"])
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match=r"/d: no metrics.json; that finetune step did not finish"):
        runs_by_name([tmp_path / "a", tmp_path / "d"])


def test_saliency_asked_of_data_without_gaze_maps_fails_at_preprocess(pocus_subset, tmp_path, monkeypatch):
    """Real videos without gaze maps: the first step fails, naming the dataset and the way out, before any training
    (run-local before it starts kfp); with tasks=["planes"] it makes the clip dataset."""
    from sonossl.pipeline.steps import PARAMS_ENV, preprocess_step

    monkeypatch.setenv(PARAMS_ENV, str(REPO / "params.yaml"))
    with pytest.raises(ValueError, match=rf"{pocus_subset}: no gaze maps .* run it with tasks \['planes'\] "
                                         r"\(--param tasks=planes\)"):
        preprocess_step(str(pocus_subset), tmp_path / "a", "tiny")
    assert not (tmp_path / "a").exists()  # nothing preprocessed
    assert preprocess_step(str(pocus_subset), tmp_path / "b", "tiny", ["planes"])
    assert not (tmp_path / "b" / "saliency.npy").exists()
    # run-local checks a local folder before kfp starts (in a task, the error would come after the step's retries)
    proc = _run(*SONOSSL, "pipeline", "run-local", "--out", str(tmp_path / "rl"), "--dataset", str(pocus_subset))
    assert proc.returncode == 2 and "no gaze maps" in proc.stderr and "--param tasks=planes" in proc.stderr
    assert not (tmp_path / "rl" / "kfp").exists()
    # the profile and the dataset are run-local's own options: as --param they are refused, before anything is made
    from sonossl.pipeline.local import run_local, run_local_crossval

    for key, value in (("profile", "default"), ("dataset", str(pocus_subset))):
        with pytest.raises(ValueError, match=f"--param {key}={value}: run-local takes the {key} as --{key} "):
            run_local(tmp_path / "rl2", arguments={key: value})
        with pytest.raises(ValueError, match=f"--param {key}={value}: run-local takes the {key} as --{key} "):
            run_local_crossval(tmp_path / "rl2", str(pocus_subset), arguments={key: value})
    assert not (tmp_path / "rl2").exists()
    # a dvc:// location without the dataset (a typo) fails before kfp starts, not after the first task's tries
    with pytest.raises(FileNotFoundError, match=f"dataset dvc://data/raw/simm\\?repo={REPO}: no "
                                                f"data/raw/simm/labels.csv in {REPO} at revision HEAD"):
        run_local(tmp_path / "rl3", dataset=f"dvc://data/raw/simm?repo={REPO}")
    assert not (tmp_path / "rl3").exists()


def test_a_failed_local_run_names_what_went_wrong_in_its_task():
    """kfp.local's error names only the task, in colour codes; the task's own error is in its output, which
    run-local keeps the last lines of as it passes them on: the message ends with that error and its lines."""
    import contextlib
    import io

    from sonossl.pipeline.local import _Tail, failure_message

    out = io.StringIO()
    tail = _Tail(out)
    printed = ("19:51:40.1 - INFO - Executing task \x1b[96m'preprocess'\x1b[0m\n"
               "    Traceback (most recent call last):\n"
               "      File \"/app/src/sonossl/data/clips.py\", line 1090, in preprocess\n"
               "        raise PreprocessError(\n"
               "    sonossl.data.clips.PreprocessError: /data/raw: no usable video among the 1 listed in labels.csv:\n"
               "      missing.mp4: file not found\n"
               "    \n"
               "19:51:48.9 - ERROR - Task \x1b[96m'preprocess'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m\n")
    with contextlib.redirect_stdout(tail):
        for part in (printed[:37], printed[37:200], printed[200:]):  # lines arrive in pieces, as print writes them
            print(part, end="")
    assert out.getvalue() == printed and len(tail.lines) == 8  # passed on whole; every complete line kept
    kfp = ("Pipeline \x1b[95m'sonossl-training'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m. Inner task "
           "failed: \x1b[96m'preprocess'\x1b[0m.")
    assert failure_message(kfp, tail.lines) == (
        "Pipeline 'sonossl-training' finished with status FAILURE. Inner task failed: 'preprocess'. The task's error: "
        "sonossl.data.clips.PreprocessError: /data/raw: no usable video among the 1 listed in labels.csv:\n"
        "  missing.mp4: file not found")
    assert failure_message(kfp, ["no traceback here"]).endswith("Inner task failed: 'preprocess'.")


def test_an_s3_dataset_without_labels_csv_is_refused_before_the_pipeline_starts(s3_server, tmp_path):
    from sonossl.pipeline.dataset import check_raw_dataset
    from sonossl.storage import put_bytes

    uri = f"s3://{s3_server.bucket}/raw/lungs"
    with pytest.raises(FileNotFoundError, match=f"dataset {uri}: no labels.csv there"):
        check_raw_dataset(uri)
    put_bytes(b"path,label\n", f"{uri}/labels.csv")
    check_raw_dataset(uri + "/")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")  # kfp.local on the image tag
@pytest.mark.filterwarnings("ignore:Task .* have no effect in the current local runner:UserWarning")  # GPU settings
def test_run_local_on_real_videos_without_gaze_maps_trains_plane_models_only(pocus_subset, tmp_path):
    """The training pipeline with tasks=["planes"] on real POCUS videos (no gaze maps): one fine-tune per
    initialisation, a report and a served model without saliency, and the deploy gate on its classifier."""
    from sonossl.pipeline.local import run_local

    summary = run_local(tmp_path, profile="tiny", dataset=str(pocus_subset), params_file=REPO / "params.yaml",
                        arguments={"tasks": ["planes"]})
    run = Path(summary["run"])
    assert sorted(summary["tasks"]) == ["champion", "deploy", "evaluate", "export", "for-loop-1-iteration-0/finetune",
                                        "for-loop-2-iteration-0/finetune-2", "preprocess", "preprocess-test",
                                        "pretrain"]
    names = {json.loads((run / t / "model/metrics.json").read_text())["name"] for t in summary["tasks"]
             if "/finetune" in t}
    assert names == {"ssl-planes", "scratch-planes"}
    card = json.loads((Path(summary["model"]) / "model_card.json").read_text())
    assert card["saliency"] is None and card["classes"] == ["covid", "pneumonia", "regular"]
    report = Path(summary["report"]).read_text()
    assert "| SSL (both-sequential) |" in report and "Saliency" not in report
    logged = summary["tasks"]["export"]["artifacts"]["metrics"]["metadata"]
    assert set(logged) == {"planes.val.macro_f1", "planes.val.accuracy", "planes.test.macro_f1",
                           "planes.test.accuracy"}
    assert summary["deploy"] == "deploy"
    assert summary["inference_service"]["storageUri"].endswith(f"{card['model_version']}/")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")  # kfp.local on the image tag
@pytest.mark.filterwarnings("ignore:Task .* have no effect in the current local runner:UserWarning")  # requests
def test_the_monitoring_pipeline_reports_drift_of_a_real_request_log(drift_export, tmp_path, monkeypatch):
    """A real server logs the tiny sweeps it serves; the monitoring pipeline (kfp.local) reports on that log."""
    from kfp import local

    from conftest import start_server, stop_server
    from sonossl.pipeline.spec import pipeline_function
    from sonossl.serve.client import Client

    raw = drift_export.parent / "raw"
    videos = [raw / line.split(",")[0] for line in (raw / "labels.csv").read_text().splitlines()[1:]]
    srv = start_server(drift_export, tmp_path, str(tmp_path / "requests"))
    try:
        frames = sum(Client(srv.url).infer_video(v)["probs"].shape[0] for v in videos)
    finally:
        stop_server(srv)

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    pipeline_function("monitoring")(model_uri=str(drift_export), request_log=str(tmp_path / "requests"),
                                    reports=str(tmp_path / "reports"), window_days=0)  # today's log: all of it
    (run,) = (tmp_path / "root").glob("sonossl-monitoring-*")
    out = json.loads((run / "drift/executor_output.json").read_text())
    logged = out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert logged["frames"] == frames and logged["reference_frames"] > 0 and "embedding.score" in logged
    assert out["parameterValues"]["Output"] is False  # it served the training sweeps themselves: no drift
    assert (run / "drift/report").read_text().lstrip().lower().startswith("<!doctype html")
    index = json.loads((tmp_path / "reports/index.json").read_text())  # the kept history: one window so far
    assert [(w["frames"], w["drift_detected"]) for w in index] == [(frames, False)]


@pytest.mark.slow
def test_the_crossval_pipeline_runs_on_real_videos_as_the_library_does(pocus_subset, tmp_path, s3_server):
    """`sonossl pipeline run-local --pipeline crossval` (kfp.local: preprocess -> crossval) on 12 real POCUS videos,
    tiny profile, 2 folds, with a checkpoint store on a local S3 server: its results, report and logged metrics are
    those of the library's crossval on the same clips, and the store holds the step's folder. Without --dataset it
    refuses at once."""
    from sonossl.config import load_params
    from sonossl.train.crossval import crossval

    cmd = [*SONOSSL, "pipeline", "run-local", "--pipeline", "crossval", "--out", str(tmp_path / "local")]
    proc = _run(*cmd)
    assert proc.returncode == 2 and "give --dataset" in proc.stderr, proc.stderr
    store = f"s3://{s3_server.bucket}/checkpoints"
    proc = _run(*cmd, "--dataset", str(pocus_subset), "--param", "folds=2", "--param", f"checkpoint_store={store}",
                timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    run, logged = Path(summary["run"]), summary["metrics"]
    results = json.loads(Path(summary["results"]).read_text())
    assert run.name.startswith("sonossl-crossval-") and summary["profile"] == "tiny"
    assert results["folds"] == 2 and results["videos"] == 12 and (run / "crossval/results/folds/fold1").is_dir()
    assert Path(summary["report"]).read_text().startswith(
        "### Video classification, 2-fold cross-validation grouped by patient:")
    stored = s3_server.objects()
    (key,) = {k.split("/")[2] for k in stored}  # checkpoints/crossval/<work key>/...
    assert stored[f"checkpoints/crossval/{key}/results.json"] == Path(summary["results"]).read_bytes()
    assert any(k.startswith(f"checkpoints/crossval/{key}/folds/fold1/") for k in stored)

    params = load_params(REPO / "params.yaml", "tiny")
    params = dataclasses.replace(params, crossval=dataclasses.replace(params.crossval, folds=2))
    direct = crossval(run / "preprocess/clips", tmp_path / "direct", params, progress=False)
    assert [(r["init"], r["method"], r["accuracy"], r["per_class_f1"]) for r in results["results"]] == \
        [(r["init"], r["method"], r["accuracy"], r["per_class_f1"]) for r in direct["results"]]
    for r in direct["results"]:
        assert logged[f"{r['init']}/{r['method']}.video_accuracy"] == r["accuracy"]
        assert logged[f"{r['init']}/{r['method']}.f1_covid"] == r["per_class_f1"]["covid"]


def test_run_local_crossval_checks_the_listing_before_kfp_starts(tmp_path):
    """A local dataset whose labels.csv lacks a patient_id (or a label) for some video fails at once, naming it."""
    raw = tmp_path / "raw"
    raw.mkdir()
    cmd = [*SONOSSL, "pipeline", "run-local", "--pipeline", "crossval", "--dataset", str(raw), "--out",
           str(tmp_path / "out")]
    for text, message in [("path,label\na.mp4,covid\n", "crossval needs a patient_id for every video; 1 row(s)"),
                          ("path,label,patient_id\na.mp4,covid,p1\nb.mp4,,p2\n",
                           "crossval needs a label (or annotations file) for every video; 1 row(s) of labels.csv "
                           "have none, e.g. row 3 ('b.mp4')")]:
        (raw / "labels.csv").write_text(text)
        proc = _run(*cmd)
        assert proc.returncode == 2 and f"{raw}: {message}" in proc.stderr, proc.stderr
        assert not (tmp_path / "out/kfp").exists()
    # a local folder that does not exist (a typo) fails at once too, for either pipeline, naming it
    for pipeline in ("crossval", "training"):
        proc = _run(*SONOSSL, "pipeline", "run-local", "--pipeline", pipeline, "--dataset", str(tmp_path / "nodata"),
                    "--out", str(tmp_path / "typo"))
        assert proc.returncode == 2 and f"dataset '{tmp_path / 'nodata'}': no such folder" in proc.stderr, proc.stderr
        assert not (tmp_path / "typo").exists()  # nothing made, nothing simulated


def test_crossval_step_checks_its_overrides():
    from sonossl.config import ParamsError
    from sonossl.pipeline.steps import crossval_step

    for kwargs, message in [({"folds": 1}, "folds=1: must be at least 2"),
                            ({"pretrain_epochs": -1}, "pretrain_epochs=-1: must be positive")]:
        with pytest.raises(ParamsError, match=message):
            crossval_step("no/clips", "no/out", "no/report.md", "tiny", **kwargs)


def test_sigterm_stops_run_local_and_its_task_processes_at_once(tmp_path):
    """SIGTERM to `sonossl pipeline run-local` reaches the kfp.local task running under it (and that task's own
    processes): exit 143 within seconds, no task process left behind (before, kfp.local's clean-up waited for the
    running task to finish, 7-9 s of a tiny fine-tune in a review; on a real profile, a whole step)."""
    import signal

    from sonossl.cli import _child_processes as descendants

    proc = subprocess.Popen([sys.executable, "-m", "sonossl.cli", "pipeline", "run-local", "--params",
                             str(REPO / "params.yaml"), "--out", str(tmp_path / "rl")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def finetuning() -> bool:  # a fine-tune task has started: several seconds of work even on the tiny profile
        for pid in descendants(proc.pid):
            try:
                if b"finetune" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:
                pass
        return False

    deadline = time.monotonic() + 300
    while not finetuning() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    tasks = descendants(proc.pid)
    assert finetuning(), "a kfp.local fine-tune task should be running"
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    took = time.monotonic() - start
    assert took < 20, "it waited for the running task instead of stopping it"
    assert "stopped (SIGTERM)" in proc.stderr.read()
    time.sleep(2)
    left = [pid for pid in tasks if Path(f"/proc/{pid}").exists() and "zombie" not in
            Path(f"/proc/{pid}/status").read_text()]
    assert not left, left
