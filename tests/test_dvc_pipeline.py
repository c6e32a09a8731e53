"""`dvc repro` in a temporary copy of the repository, on the tiny profile: it runs, a second run does nothing, and a
parameter change reruns exactly the stages downstream of it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = "preprocess@sim"  # the data stages (simulate is upstream); the training stages have their own test below


def _copy_repo(dst: Path, source: Path = REPO) -> None:
    """What git holds of ``source`` (tracked, and untracked but not ignored), copied into a new git repository."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=source,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = source / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)


def _edit_params(root: Path, edit) -> None:
    doc = yaml.safe_load((root / "params.yaml").read_text())
    edit(doc)
    (root / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def _dvc(root: Path, *args: str, ok: bool = True) -> str:
    """``dvc <args>`` in ``root``; its output. ``ok=False``: the command must fail."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the `sonossl` of this venv
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    assert (proc.returncode == 0) == ok, \
        f"dvc {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _tiny_sim_repo(tmp_path: Path) -> Path:
    """A copy of the repository on the tiny profile, simulated data only (POCUS has its own tests)."""
    root = tmp_path / "repo"
    root.mkdir()
    _copy_repo(root)

    def tiny_sim_only(doc):
        doc["profile"] = "tiny"
        doc["datasets"] = {k: v for k, v in doc["datasets"].items() if k in ("sim", "sim_test")}

    _edit_params(root, tiny_sim_only)
    return root


@pytest.mark.slow
def test_dvc_repro_runs_once_then_only_what_changed(tmp_path):
    root = _tiny_sim_repo(tmp_path)

    out = _dvc(root, "repro", DATA)
    assert "Running stage 'simulate'" in out and "Running stage 'preprocess@sim'" in out
    meta = json.loads((root / "data/clips/sim/meta.json").read_text())
    assert (root / "data/raw/sim/labels.csv").is_file() and (root / "data/clips/sim/frames.npy").is_file()
    assert "version" in meta and (root / "dvc.lock").is_file()

    out = _dvc(root, "repro", DATA)
    assert "Running stage" not in out, out
    assert "up to date" in _dvc(root, "status", DATA)

    # Another profile's block is not tracked: editing it reruns nothing.
    _edit_params(root, lambda d: d["default"]["preprocess"].update(frame_size=100))
    assert "Running stage" not in _dvc(root, "repro", DATA)

    # A preprocessing parameter of the active profile: preprocess reruns, the simulation does not.
    _edit_params(root, lambda d: d["tiny"]["preprocess"].update(frame_size=24))
    out = _dvc(root, "repro", DATA)
    assert "Running stage 'preprocess@sim'" in out and "Running stage 'simulate'" not in out, out
    meta2 = json.loads((root / "data/clips/sim/meta.json").read_text())
    assert meta2["version"] != meta["version"]
    assert "Running stage" not in _dvc(root, "repro", DATA)

    # The parameters' defaults (a field params.yaml leaves out, such as preprocess.split.train) live in the code:
    # every stage with parameters depends on it
    config = root / "src/sonossl/config.py"
    config.write_text(config.read_text() + "\n# a default changed\n")
    for stage in ("simulate", DATA):
        assert "modified:           src/sonossl/config.py" in _dvc(root, "status", stage), stage

    # A stage runs the code of the repository it is in (the code DVC hashes), not the checkout the virtualenv's
    # editable install points at: a queued experiment's copy, or a second clone sharing the venv
    simulate = root / "src/sonossl/data/simulate.py"
    simulate.write_text(simulate.read_text() + "\nimport sys\nprint('THIS COPY OF THE CODE', file=sys.stderr)\n")
    assert "THIS COPY OF THE CODE" in _dvc(root, "repro", "simulate")


def test_dvc_add_of_your_own_videos_gives_a_dvc_file_git_commits_and_ignores_the_videos(tmp_path):
    """README, "Your own videos", step 2: `dvc add data/raw/<name>`, then commit the .dvc file (a .gitignore of the
    whole of data/ made DVC refuse: "bad DVC file name 'data/raw/mine.dvc' is git-ignored")."""
    root = tmp_path / "repo"
    root.mkdir()
    _copy_repo(root)
    videos = root / "data/raw/mine/videos"
    videos.mkdir(parents=True)
    (videos / "a.mp4").write_bytes(b"not really a video, but a file to version")
    (root / "data/raw/mine/labels.csv").write_text("path,label\nvideos/a.mp4,x\n")
    _dvc(root, "add", "data/raw/mine")

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout

    git("add", "data/raw/mine.dvc", "data/raw/.gitignore")
    status = git("status", "--porcelain", "--untracked-files=all", "data/")
    assert "A  data/raw/mine.dvc" in status and "data/raw/mine/" not in status, status
    assert "/mine" in (root / "data/raw/.gitignore").read_text().split()


@pytest.mark.slow
def test_dvc_repro_runs_the_whole_pipeline_on_tiny(tmp_path):
    """simulate -> preprocess -> pretrain (the pipeline's encoder, and the 4 modes of the ablation at their own
    budget) -> finetune -> evaluate -> export; metrics listed by DVC."""
    root = _tiny_sim_repo(tmp_path)
    out = _dvc(root, "repro", "export", "evaluate")  # without POCUS (crossval has its own test), as `make run` does
    for stage in ("simulate-test", "preprocess@sim_test", "pretrain@order", "finetune@ssl-planes", "scratch@saliency",
                  "evaluate", "export"):
        assert f"Running stage '{stage}'" in out, out
    shown = _dvc(root, "metrics", "show")
    assert "reports/metrics.json" in shown and "models/pretrain/both-sequential/metrics.json" in shown
    card = json.loads((root / "models/export/model_card.json").read_text())
    meta = json.loads((root / "data/clips/sim/meta.json").read_text())
    assert card["data"]["feature_version"] == meta["version"]
    results = (root / "reports/results.md").read_text()
    assert "| SSL (both-sequential) |" in results and "### Standard-plane detection: test macro-F1" in results
    # the pipeline's encoder at pretrain.epochs (tiny: 2), the ablation's four at pretrain.ablation_epochs (1)
    epochs = {m: json.loads((root / f"models/pretrain/{m}/metrics.json").read_text())["epochs"]
              for m in ("both-sequential", "both-sequential-ablation", "order", "transform", "both-parallel")}
    assert epochs == {"both-sequential": 2, "both-sequential-ablation": 1, "order": 1, "transform": 1,
                      "both-parallel": 1}, epochs
    assert "| both-sequential (ablation) |" in results and "| both-sequential-ablation | 1 |" in results
    # the scores come from the independent simulated test set, all of it, and the report and the card say so
    test_meta = json.loads((root / "data/clips/sim_test/meta.json").read_text())
    assert f"every frame of data/clips/sim_test (version {test_meta['version']})" in results
    assert card["test_set"]["planes"]["data_version"] == test_meta["version"]
    assert card["test_set"]["planes"]["frames"] == test_meta["counts"]["frames"]
    assert "Running stage" not in _dvc(root, "repro", "export", "evaluate")

    # A code change that retrains the encoders to the same weights (here: a comment in the pretext code) reruns
    # the five pretrain stages, which write the same encoder.pt bytes, so no fine-tune runs again, nor export.
    # (evaluate does, in seconds: it reads the pretrain stages' metrics.json, whose throughput figure is new.)
    batch = root / "src/sonossl/pretext/batch.py"
    batch.write_text(batch.read_text() + "\n# a change that trains the same weights\n")
    out = _dvc(root, "repro", "export", "evaluate")
    assert "Running stage 'pretrain@both-sequential'" in out and "Running stage 'pretrain@order'" in out, out
    for stage in ("finetune@ssl-planes", "finetune@sequential-planes", "finetune@order-planes",
                  "finetune@parallel-planes", "export"):
        assert f"Running stage '{stage}'" not in out, out


@pytest.mark.slow
def test_dvc_repro_trains_on_the_datasets_listed_under_train(tmp_path, pocus_subset):
    """`train: [my scans]` and `crossval_datasets: [my scans]` (12 real videos; a name with a space, as a user may
    write it): preprocess@my scans, then pretrain, the SSL and scratch fine-tunes, the report and the export under
    models/datasets/my scans, and its cross-validation by patient; DVC lists their metrics; a second run does
    nothing; the exported classifier answers a request."""
    mine = "my scans"
    root = tmp_path / "repo"
    root.mkdir()
    _copy_repo(root)
    _edit_params(root, lambda d: d.update(profile="tiny", datasets={mine: str(pocus_subset)}, train=[mine],
                                          crossval_datasets=[mine]))
    targets = (f"train-export@{mine}", f"train-evaluate@{mine}", f"train-crossval@{mine}")
    out = _dvc(root, "repro", *targets)
    for stage in (*(f"{s}@{mine}" for s in ("preprocess", "train-pretrain", "train-ssl", "train-scratch")), *targets):
        assert f"Running stage '{stage}'" in out, out
    assert "Running stage 'simulate'" not in out and "Running stage 'pretrain@" not in out
    assert "Running stage 'crossval'" not in out  # POCUS's own stage
    cv = json.loads((root / f"models/datasets/{mine}/crossval/results.json").read_text())
    assert cv["dataset"] == f"data/clips/{mine}" and cv["folds"] == 3 and cv["videos"] == 12
    assert (root / f"reports/datasets/{mine}/crossval.md").read_text().startswith(
        f"### Video classification, 3-fold cross-validation grouped by patient: data/clips/{mine}")
    base = root / f"models/datasets/{mine}"
    assert (base / "pretrain/both-sequential/encoder.pt").is_file()
    ssl = json.loads((base / "finetune/ssl-planes/metrics.json").read_text())
    assert ssl["encoder"] == f"models/datasets/{mine}/pretrain/both-sequential" and ssl["task"] == "planes"
    card = json.loads((base / "export/model_card.json").read_text())
    meta = json.loads((root / f"data/clips/{mine}/meta.json").read_text())
    assert card["data"]["feature_version"] == meta["version"]
    assert card["classes"] == ["covid", "pneumonia", "regular"]
    assert card["metrics"]["saliency"] is None
    results = (root / f"reports/datasets/{mine}/results.md").read_text()
    assert "| SSL (both-sequential) |" in results and "| scratch (random init) |" in results
    assert "### Frame classification (covid, pneumonia, regular): test macro-F1" in results
    assert f"the test split of data/clips/{mine} (version {meta['version']})" in results
    shown = _dvc(root, "metrics", "show")
    for path in (f"reports/datasets/{mine}/metrics.json",
                 f"models/datasets/{mine}/finetune/ssl-planes/metrics.json",
                 f"models/datasets/{mine}/pretrain/both-sequential/metrics.json",
                 f"models/datasets/{mine}/crossval/metrics.json"):
        assert path in shown, shown
    assert "Running stage" not in _dvc(root, "repro", *targets)
    # the resume folders are not part of anything: a clone has none, and nothing is out of date without them
    for folder in [*base.rglob("runs"), *base.rglob("checkpoints"), *base.rglob("folds")]:
        if folder.exists():  # not inside one removed already
            shutil.rmtree(folder)
    assert "up to date" in _dvc(root, "status", *targets)

    from sonossl.serve.model import SonosslModel

    model = SonosslModel(model_dir=base / "export")
    model.load()
    size = card["input"]["frame_size"]
    frames = np.load(root / f"data/clips/{mine}/frames.npy", mmap_mode="r")[:3]
    answer = model.predict({"instances": np.asarray(frames).tolist()})
    assert [set(p) for p in answer["predictions"]] == [{"label", "probs", "embedding", "blank"}] * 3
    assert answer["predictions"][0]["label"] in card["classes"] and frames.shape[1] == size

    # Under train_saliency without gaze maps: the saliency fine-tune fails, naming the clips, before training.
    _edit_params(root, lambda d: d.update(train_saliency=[mine]))
    out = _dvc(root, "repro", f"train-ssl-saliency@{mine}", ok=False)
    assert f"data/clips/{mine}: no saliency maps in this clip dataset" in out, out
    assert not (base / "finetune/ssl-saliency/model.pt").exists()


@pytest.mark.slow
def test_dvc_repro_fine_tunes_saliency_on_the_datasets_under_train_saliency(tmp_path, tiny_clips):
    """`train: [sweeps]` and `train_saliency: [sweeps]` (the tiny simulated sweeps, with their gaze maps, as your
    own dataset): the SSL and scratch saliency fine-tunes run beside the planes ones, the report and the export
    include them, and the served model answers with saliency maps. Taken off train_saliency again, the dataset's
    report and export are made again without them, and nothing else runs."""
    root = tmp_path / "repo"
    root.mkdir()
    _copy_repo(root)
    _edit_params(root, lambda d: d.update(profile="tiny", datasets={"sweeps": str(tiny_clips.parent / "raw")},
                                          train=["sweeps"], train_saliency=["sweeps"]))
    targets = ("train-export@sweeps", "train-evaluate@sweeps")
    out = _dvc(root, "repro", *targets)
    for stage in ("train-pretrain@sweeps", "train-ssl@sweeps", "train-scratch@sweeps", "train-ssl-saliency@sweeps",
                  "train-scratch-saliency@sweeps", *targets):
        assert f"Running stage '{stage}'" in out, out
    base = root / "models/datasets/sweeps"
    ssl = json.loads((base / "finetune/ssl-saliency/metrics.json").read_text())
    assert ssl["task"] == "saliency" and ssl["encoder"] == "models/datasets/sweeps/pretrain/both-sequential"
    card = json.loads((base / "export/model_card.json").read_text())
    assert card["saliency"]["source"] in ("ssl-saliency", "scratch-saliency")
    assert set(card["metrics"]["saliency"]["test"]) >= {"kld", "cc", "nss", "sim", "auc_judd"}
    results = (root / "reports/datasets/sweeps/results.md").read_text()
    assert "### Saliency prediction: test scores" in results and "### Standard-plane detection" in results
    assert "saliency/ssl/finetune@1" in json.loads((root / "reports/datasets/sweeps/metrics.json").read_text())
    assert "models/datasets/sweeps/finetune/scratch-saliency/metrics.json" in _dvc(root, "metrics", "show")
    assert "Running stage" not in _dvc(root, "repro", *targets)

    from sonossl.serve.model import SonosslModel

    model = SonosslModel(model_dir=base / "export")
    model.load()
    frames = np.load(root / "data/clips/sweeps/frames.npy", mmap_mode="r")[:2]
    answer = model.predict({"instances": np.asarray(frames).tolist()})
    assert set(answer["predictions"][0]) == {"label", "probs", "embedding", "blank", "saliency"}
    assert np.asarray(answer["predictions"][0]["saliency"]).ndim == 2

    _edit_params(root, lambda d: d.update(train_saliency=[]))
    out = _dvc(root, "repro", *targets)
    assert "Running stage 'train-export@sweeps'" in out and "Running stage 'train-evaluate@sweeps'" in out, out
    assert out.count("Running stage") == 2, out
    card = json.loads((base / "export/model_card.json").read_text())
    assert card["saliency"] is None and card["metrics"]["saliency"] is None
    assert "Saliency" not in (root / "reports/datasets/sweeps/results.md").read_text()


def test_pipeline_time_gives_each_stage_the_time_until_the_next_one_starts(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from pipeline_time import stage_seconds, summarise

    lines = [(0.5, "Running stage 'simulate':\n"), (3.0, "epoch 1/6: 50%\n"),
             (10.0, "Running stage 'pretrain@order':\n"), (30.0, "Running stage 'preprocess@pocus':\n"),
             (35.5, "Running stage 'crossval':\n")]
    stages = stage_seconds(lines, end=100.0)
    assert stages == {"simulate": 9.5, "pretrain@order": 20.0, "preprocess@pocus": 5.5, "crossval": 64.5}
    assert summarise(stages) == {"simulated_s": 29.5, "crossval_s": 64.5}  # POCUS stages are not the simulated part
    assert summarise({"simulate": 2.0}) == {"simulated_s": 2.0, "crossval_s": None}
    # your own datasets' stages are not the simulated pipeline either
    assert summarise({"preprocess@sim": 1.0, "preprocess@sim_test": 2.0, "preprocess@mine": 4.0,
                      "train-pretrain@mine": 8.0, "train-export@mine": 16.0, "train-crossval@mine": 32.0}) == {
        "simulated_s": 3.0, "crossval_s": None}


@pytest.mark.slow
def test_pipeline_time_reruns_every_target_stage_and_records_its_time(tmp_path, monkeypatch):
    """``benchmarks/pipeline_time.py`` forces the stages to run again even when DVC has nothing to do, and records
    each of them."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    root = _tiny_sim_repo(tmp_path)
    _dvc(root, "repro", DATA)
    out = tmp_path / "time.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/pipeline_time.py"), "--repo", str(root),
                           "--targets", DATA, "--no-yardstick", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Running stage 'simulate'" in proc.stderr  # DVC's output, passed on as it comes
    record = json.loads(out.read_text())
    assert list(record["stages_s"]) == ["simulate", "preprocess@sim"] and record["targets"] == [DATA]
    assert record["simulated_s"] == pytest.approx(sum(record["stages_s"].values()), abs=0.11)
    assert 0 < record["simulated_s"] <= record["total_s"] and record["crossval_s"] is None
    assert "yardstick" not in record and record["machine"]
    # training stages would resume from their checkpoints: the benchmark deletes exactly those of its targets
    import pipeline_time

    for data in ("data/raw/runs", "data/clips/folds"):  # data that happens to carry such a name is not touched
        (root / data).mkdir(parents=True)
    assert pipeline_time.resume_state(root, [DATA]) == []
    for folder in ("pretrain/order/checkpoints", "pretrain/both-sequential/checkpoints", "finetune/ssl-planes/runs"):
        (root / "models" / folder).mkdir(parents=True)
    order = pipeline_time.resume_state(root, ["pretrain@order"])
    assert {root / "models/pretrain/order/checkpoints", root / "models/pretrain/order/live/plots/metrics"} <= set(order)
    assert not any("both-sequential" in str(p) for p in order)
    every = pipeline_time.resume_state(root, [])
    assert set(order) < set(every) and root / "models/finetune/ssl-planes/runs" in every
    assert not any(p.is_relative_to(root / "data") for p in every)
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks/pipeline_time.py"), "--repo", str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no dvc.yaml there" in bad.stderr
