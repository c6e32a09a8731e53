"""The training loop and the steps on it: pretrain, finetune, evaluate, export on the tiny profile; checkpoints,
resume after kill -9, damaged checkpoints, DDP under torchrun."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sonossl.train.loop import CheckpointError, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "sonossl.cli", "-q", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_pretrain_writes_encoder_metrics_and_the_permutation_set_it_trained_with(tiny_clips, tiny_params, tmp_path):
    from sonossl.train.pretrain import load_encoder, pretrain

    p = tiny_params.pretrain
    m = pretrain(tiny_clips, tmp_path / "pt", p, mode="both-parallel", progress=False)
    assert set(m["val"]) >= {"order_acc", "rotation_acc", "scale_acc", "shear_acc"}
    assert m["chance"]["order_acc"] == round(1 / 12, 4)
    enc, ckpt = load_encoder(tmp_path / "pt")
    # the classes it trained with, in their order, travel with the encoder (a later change of the set's
    # construction cannot silently relabel them)
    from sonossl.pretext.permutations import permutation_set

    assert ckpt["pretext"]["permutations"] == permutation_set(p.k, p.n_permutations, p.seed).tolist()
    assert len(ckpt["pretext"]["permutations"]) == 12 and ckpt["data_version"] == m["data_version"]
    live = json.loads((tmp_path / "pt/live/metrics.json").read_text())
    assert "val" in live and "train" in live
    hist = load_checkpoint(tmp_path / "pt/checkpoints/last.pt")["history"]
    assert len(hist) == p.epochs


def test_resume_continues_only_the_same_run(tiny_clips, tiny_params, tmp_path, caplog, monkeypatch):
    from sonossl.train import loop
    from sonossl.train.pretrain import pretrain

    p = dataclasses.replace(tiny_params.pretrain, epochs=2)
    pretrain(tiny_clips, tmp_path / "pt", p, mode="transform", progress=False)
    ck = load_checkpoint(tmp_path / "pt/checkpoints/last.pt")
    assert ck["epoch"] == 2
    caplog.set_level("INFO")
    pretrain(tiny_clips, tmp_path / "pt", p, mode="transform", resume=True, progress=True)
    assert "resuming after epoch 2 of 2" in caplog.text
    caplog.clear()
    pretrain(tiny_clips, tmp_path / "pt", dataclasses.replace(p, lr=5e-4), mode="transform", resume=True)
    assert "belongs to another run (its parameters, data or mode differ): not resumed" in caplog.text
    assert [r.levelname for r in caplog.records if "belongs to another run" in r.message] == ["WARNING"]
    caplog.clear()  # a new version of any of the package's files: the message says so
    monkeypatch.setattr(loop, "code_version", lambda: "0123456789abcdef")
    pretrain(tiny_clips, tmp_path / "pt", dataclasses.replace(p, lr=5e-4), mode="transform", resume=True)
    assert "belongs to another run (sonossl's code changed (any .py file of the package))" in caplog.text


def test_the_same_pretraining_writes_the_same_encoder_bytes(tiny_clips, tiny_params, tmp_path):
    """encoder.pt is a DVC output that every finetune stage depends on: two runs that train the same weights must
    write the same file, or `dvc repro` retrains everything downstream of a change that altered nothing (a
    throughput figure inside it did exactly that). The throughput stays in metrics.json."""
    from sonossl.train.pretrain import pretrain

    p = dataclasses.replace(tiny_params.pretrain, epochs=1)
    for run in ("a", "b"):
        pretrain(tiny_clips, tmp_path / run, p, mode="order", progress=False)
    assert (tmp_path / "a/encoder.pt").read_bytes() == (tmp_path / "b/encoder.pt").read_bytes()
    assert json.loads((tmp_path / "a/metrics.json").read_text())["clips_per_s"] > 0
    assert "clips_per_s" not in load_checkpoint(tmp_path / "a/encoder.pt")["metrics"]


def test_the_ablation_budget_replaces_the_epochs(tiny_params):
    from sonossl.train.pretrain import at_budget

    p = dataclasses.replace(tiny_params.pretrain, epochs=24, ablation_epochs=8)
    assert at_budget(p, "main") == p
    assert (at_budget(p, "ablation").epochs, at_budget(p, "ablation").ablation_epochs) == (8, 8)
    unset = dataclasses.replace(p, ablation_epochs=None)
    assert at_budget(unset, "ablation") == unset  # null: the ablation trains as long as the pipeline's encoder
    with pytest.raises(ValueError, match="pretrain.ablation_epochs: must be at least 1, got 0"):
        at_budget(dataclasses.replace(p, ablation_epochs=0), "main")
    with pytest.raises(ValueError, match="budget 'full' is not one of"):
        at_budget(p, "full")


def test_truncated_checkpoint_names_the_file(tiny_clips, tiny_params, tmp_path):
    from sonossl.train.pretrain import pretrain

    pretrain(tiny_clips, tmp_path / "pt", tiny_params.pretrain, mode="order", progress=False)
    last = tmp_path / "pt/checkpoints/last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=str(last)):
        load_checkpoint(last)
    proc = _cli("pretrain", "--profile", "tiny", "--clips", str(tiny_clips), "--mode", "order",
                "--out", str(tmp_path / "pt"), "--resume")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "last.pt" in out and "truncated or corrupted" in out


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_from_the_last_checkpoint(tiny_clips, tmp_path):
    params = tmp_path / "params.yaml"
    import yaml

    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    doc["tiny"]["pretrain"].update(epochs=40, clips_per_epoch=64)
    params.write_text(yaml.safe_dump(doc))
    args = ("pretrain", "--params", str(params), "--profile", "tiny", "--clips", str(tiny_clips),
            "--mode", "both-sequential", "--out", str(tmp_path / "pt"), "--resume")
    proc = _cli(*args)
    last = tmp_path / "pt/checkpoints/last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if last.is_file() and load_checkpoint(last)["epoch"] >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = load_checkpoint(last)["epoch"]  # the file is whole: written atomically
    assert 3 <= done < 40
    proc = _cli(*args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"resuming after epoch {done} of 40" in out
    ck = load_checkpoint(last)
    assert ck["epoch"] == 40 and [h["epoch"] for h in ck["history"]] == list(range(1, 41))


@pytest.mark.slow
def test_pretrain_under_torchrun_two_processes_on_cpu(tiny_clips, tmp_path):
    """gloo DDP; the order mode also checks that weights without a gradient (the unread last stage) are allowed."""
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "sonossl.cli", "-q",
                           "pretrain", "--profile", "tiny", "--clips", str(tiny_clips), "--mode", "order",
                           "--out", str(tmp_path / "ddp")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = json.loads((tmp_path / "ddp/metrics.json").read_text())
    assert m["world_size"] == 2
    assert (tmp_path / "ddp/encoder.pt").is_file()


_DDP_FIT = """
import json, sys
import torch
from torch import nn
from sonossl.train.loop import LoopParams, fit, setup_distributed

class RankTask:  # a toy task whose per-batch number is the rank that ran the batch
    def __init__(self, rank):
        torch.manual_seed(0)
        self.model, self.rank = nn.Linear(3, 1), rank
    def steps_per_epoch(self, world):
        return 2
    def batches(self, epoch, rank, world, device):
        gen = torch.Generator().manual_seed(10 * epoch + rank)
        return [torch.randn(4, 3, generator=gen) for _ in range(2)]
    def loss(self, model, batch):
        loss = model(batch).pow(2).mean()
        if nan_on_rank_1 and self.rank == 1:
            loss = loss * float("nan")
        return loss, {"rank": float(self.rank)}
    def validate(self, model, device):
        return {}

env = setup_distributed()
root, stop_after = sys.argv[1], int(sys.argv[2])
nan_on_rank_1 = sys.argv[3:] == ["nan"]
task = RankTask(env.rank)
try:
    res = fit(task, f"{root}/node{env.rank}", LoopParams(epochs=4, lr=0.1, channels_last=False, stop_after=stop_after),
              resume=True, progress=False, live=False, dist_env=env, run_id="toy")
except FloatingPointError as e:  # both ranks must get here: the other one must not wait in the gradient exchange
    open(f"{root}/rank{env.rank}.err", "w").write(str(e))
    sys.exit(0)
weights = [p.tolist() for p in task.model.parameters()]
out = {"resumed_from": res.resumed_from, "history": res.history, "weights": weights}
open(f"{root}/rank{env.rank}.json", "w").write(json.dumps(out))
"""


def test_ddp_ranks_resume_from_rank_0_and_average_their_train_numbers(tmp_path):
    """Two ranks with a folder each (two nodes, no shared disk): a resumed run continues rank 0's last.pt on both
    (rank 1 has none: it would start over, and the ranks' steps would no longer pair up); ``train_*`` is the mean
    over both ranks' batches; a damaged last.pt on rank 0 stops every rank with its name."""
    script = tmp_path / "ddp_fit.py"
    script.write_text(_DDP_FIT)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(stop_after: int, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(tmp_path),
                               str(stop_after), *extra], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=120)

    first = run(2)
    assert first.returncode == 0, first.stdout + first.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [e["train_rank"] for e in ranks[0]["history"]] == [0.5, 0.5]  # rank 0's batches alone gave 0.0
    assert (tmp_path / "node0/checkpoints/last.pt").is_file() and not (tmp_path / "node1").exists()

    second = run(0)
    assert second.returncode == 0, second.stdout + second.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["resumed_from"] for r in ranks] == [2, 2]
    assert [e["epoch"] for e in ranks[0]["history"]] == [1, 2, 3, 4]
    assert ranks[0]["weights"] == ranks[1]["weights"]

    last = tmp_path / "node0/checkpoints/last.pt"
    last.write_bytes(last.read_bytes()[:100])
    broken = run(0)
    assert broken.returncode != 0
    assert f"{last}: cannot read checkpoint" in broken.stderr and f"rank 0: {last}" in broken.stderr

    # a loss that is not finite on rank 1 alone stops both ranks at that step (rank 0 used to wait in the
    # gradient exchange for rank 1, which had stopped, until the collective timed out)
    (tmp_path / "node0").rename(tmp_path / "node0-old")
    diverged = run(0, "nan")
    assert diverged.returncode == 0, diverged.stdout + diverged.stderr
    errors = [(tmp_path / f"rank{r}.err").read_text() for r in (0, 1)]
    assert errors[0].startswith("another rank's loss became non-finite (rank 0's: ") and "epoch 1, step 1" in errors[0]
    assert errors[1].startswith("rank 1's loss became nan at epoch 1, step 1")


def test_pretext_batches_are_whole_on_every_rank_when_the_clips_are_few(tiny_clips, tiny_params):
    """Fewer clips than batch_size x world: every rank still gets whole batches (rank 1 got an empty one)."""
    from sonossl.data.clips import load_clip_dataset
    from sonossl.train.pretrain import PretextTask, frames_tensor

    data = load_clip_dataset(tiny_clips)
    split = data.index.split.to_numpy()
    video = data.index.video_idx.to_numpy()
    one = split == "train"
    one &= video == video[one][0]  # the clips of one training video
    params = dataclasses.replace(tiny_params.pretrain, clips_per_epoch=None, batch_size=16)
    task = PretextTask(frames_tensor(data), video, one, split == "val", params, "both-sequential")
    assert len(task.train_starts) < 2 * 16
    for rank in (0, 1):
        batches = list(task.batches(0, rank, 2, torch.device("cpu")))
        assert len(batches) == task.steps_per_epoch(2) and all(len(b) == 16 for b in batches)


def test_ranks_train_on_different_clips(tiny_clips, tiny_params, monkeypatch):
    """Under DDP each rank takes its own share of the epoch's clips: within one pass over them no clip goes to
    two ranks (every rank on rank 0's clips would be one process's training, run twice)."""
    from sonossl.data.clips import load_clip_dataset
    from sonossl.train.pretrain import PretextTask, frames_tensor

    data = load_clip_dataset(tiny_clips)
    split = data.index.split.to_numpy()
    params = dataclasses.replace(tiny_params.pretrain, clips_per_epoch=None, batch_size=4)
    task = PretextTask(frames_tensor(data), data.index.video_idx.to_numpy(), split == "train", split == "val", params,
                       "both-sequential")
    assert task.steps_per_epoch(2) * 2 * 4 <= len(task.train_starts)  # one pass holds every rank's batches
    seen, rows = {}, task.rows
    for rank in (0, 1):
        drawn = []
        monkeypatch.setattr(task, "rows", lambda starts, drawn=drawn: drawn.extend(starts.tolist()) or rows(starts))
        assert len(list(task.batches(0, rank, 2, torch.device("cpu")))) == task.steps_per_epoch(2)
        seen[rank] = drawn
    assert len(seen[0]) == len(seen[1]) == task.steps_per_epoch(2) * 4
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0])) == len(seen[0])


def test_finetune_evaluate_export_on_tiny(tiny_clips, tiny_params, tmp_path, caplog):
    from sonossl.config import as_dict
    from sonossl.evaluate.report import evaluate
    from sonossl.export import load_bundle, export
    from sonossl.train.finetune import finetune
    from sonossl.train.pretrain import pretrain

    pretrain(tiny_clips, tmp_path / "pt/both-sequential", tiny_params.pretrain, progress=False)
    ft = tiny_params.finetune
    enc = tmp_path / "pt/both-sequential"
    spec = as_dict(tiny_params.pretrain.encoder)
    m = finetune(tiny_clips, tmp_path / "ft/ssl-planes", ft, encoder=enc, progress=False)
    assert [r["name"] for r in m["runs"]] == ["probe@0.5", "finetune@0.5", "probe@1", "finetune@1"]
    test = m["runs"][0]["test"]
    assert set(test) >= {"macro_f1", "per_class", "confusion"} and len(test["confusion"]) == len(m["classes"])
    finetune(tiny_clips, tmp_path / "ft/scratch-planes", ft, encoder_spec=spec, progress=False)
    s = finetune(tiny_clips, tmp_path / "ft/ssl-saliency", ft, task="saliency", encoder=enc, progress=False)
    assert set(s["runs"][0]["test"]) >= {"kld", "cc", "nss", "sim", "auc_judd"}

    metrics = evaluate(tmp_path / "pt", tmp_path / "ft", tmp_path / "reports")
    md = (tmp_path / "reports/results.md").read_text()
    assert "SSL (both-sequential)" in md and "scratch (random init)" in md and "Pretext accuracy" in md
    assert "planes/ssl/finetune@0.5" in metrics
    assert json.loads((tmp_path / "reports/plots/confusion_ssl.json").read_text())
    # an encoder whose order head stayed at chance is marked in the table and logged as a warning
    stuck = json.loads((tmp_path / "pt/both-sequential/metrics.json").read_text())
    stuck["val"]["order_acc"] = stuck["chance"]["order_acc"]
    (tmp_path / "stuck/both-sequential").mkdir(parents=True)
    (tmp_path / "stuck/both-sequential/metrics.json").write_text(json.dumps(stuck))
    with caplog.at_level(logging.WARNING, logger="sonossl.evaluate.report"):
        evaluate(tmp_path / "stuck", tmp_path / "ft", tmp_path / "reports-stuck")
    assert any(r.getMessage().startswith("pretrain both-sequential: held-out order accuracy 0.083 is not clearly "
                                         "above chance") for r in caplog.records)
    row = f"| both-sequential | {stuck['epochs']} | 0.083 (0.083) * |"  # the encoder, its epochs, the order head
    assert row in (tmp_path / "reports-stuck/results.md").read_text()

    card = export(tiny_clips, tmp_path / "ft", tmp_path / "export", tiny_params)
    assert card["data"]["feature_version"] == m["data_version"] and card["model_version"]
    # the card names the parameters that trained the models, not the profile export runs with (a pipeline's
    # overrides, an ablation encoder's epochs): the same card and version from a profile that says otherwise
    other = dataclasses.replace(tiny_params, pretrain=dataclasses.replace(tiny_params.pretrain, epochs=99),
                                finetune=dataclasses.replace(ft, epochs=77))
    card2 = export(tiny_clips, tmp_path / "ft", tmp_path / "export2", other)
    pretrained = card2["planes"]["origin"].get("encoder") is not None
    assert card2["params"]["pretrain"] == (as_dict(tiny_params.pretrain) if pretrained else None)
    assert card2["params"]["finetune"] == as_dict(ft) and card2["saliency"]["params"]["finetune"] == as_dict(ft)
    assert card2["saliency"]["params"]["pretrain"] == as_dict(tiny_params.pretrain)  # ssl-saliency's encoder
    assert card2["model_version"] == card["model_version"] and card2["params"] == card["params"]
    assert (tmp_path / "export/model_card.md").read_text().startswith("# Model card")
    bundle = load_bundle(tmp_path / "export")
    frames = np.load(tiny_clips / "frames.npy")[:5]
    out = bundle.predict(frames)
    assert out["probs"].shape == (5, len(card["classes"])) and np.allclose(out["probs"].sum(1), 1, atol=1e-5)
    side = card["output"]["saliency"].split(",")[1].strip()
    assert out["saliency"].shape[1] == int(side) and np.allclose(out["saliency"].sum((1, 2)), 1, atol=1e-4)
    ref = np.load(tmp_path / "export/reference/embeddings.npy")
    assert ref.shape[1] == out["embedding_reduced"].shape[1]
    # the bundle records its format (test_pool_stages_reaches_the_probe_the_fine_tune_and_the_served_model checks
    # that it predicts what the finetune run measured)
    assert torch.load(tmp_path / "export/model.pt", weights_only=True)["bundle_format"] == 1

    # a finetune output of another clip dataset (a folder left from before a re-preprocess) is refused, naming it:
    # its validation score is on other videos, and its model would ship under these clips' lineage
    import shutil

    shutil.copytree(tmp_path / "ft", tmp_path / "ft-stale")
    mpath = tmp_path / "ft-stale/scratch-planes/metrics.json"
    mpath.write_text(json.dumps({**json.loads(mpath.read_text()), "data_version": "000000000000"}))
    with pytest.raises(ValueError, match=r"scratch-planes/metrics.json: fine-tuned on clip dataset version "
                                         rf"'000000000000', not the exported clips' '{m['data_version']}'"):
        export(tiny_clips, tmp_path / "ft-stale", tmp_path / "export-stale", tiny_params)
    assert not (tmp_path / "export-stale").exists()
    # fine-tunes that scored no test videos (splits without a test share): the card says so instead of failing
    shutil.copytree(tmp_path / "ft", tmp_path / "ft-notest")
    for mpath in (tmp_path / "ft-notest").glob("*/metrics.json"):
        mj = json.loads(mpath.read_text())
        mpath.write_text(json.dumps({**mj, "runs": [{**r, "test": None} for r in mj["runs"]]}))
    card3 = export(tiny_clips, tmp_path / "ft-notest", tmp_path / "export-notest", tiny_params)
    assert card3["metrics"]["planes"]["test"] is None and card3["model_version"] == card["model_version"]
    assert "no test videos were scored" in (tmp_path / "export-notest/model_card.md").read_text()


def _index(videos: dict[int, tuple[str, list[str | None]]]):
    """A clip index: video -> (split, frame labels)."""
    import pandas as pd

    rows = [(v, split, lab) for v, (split, labels) in videos.items() for lab in labels]
    return pd.DataFrame(rows, columns=["video_idx", "split", "label"])


def test_a_dataset_without_validation_frames_is_refused_before_training(tiny_clips, tiny_params, tmp_path):
    """The probe's strength, the fine-tune's epoch and the exported run are chosen on the validation videos: with
    none (split.val 0, or too few videos to reach it) each fell silently on its first candidate."""
    import shutil

    import pandas as pd

    from sonossl.config import as_dict
    from sonossl.train.finetune import finetune

    clips = tmp_path / "clips"
    shutil.copytree(tiny_clips, clips)
    index = pd.read_parquet(clips / "index.parquet")
    index["split"] = index["split"].replace({"val": "train"})
    index.to_parquet(clips / "index.parquet")
    for task in ("planes", "saliency"):
        with pytest.raises(ValueError, match=r"clips: the validation split has no (labelled frames|frames with "
                                             r"saliency maps), and the probe's strength"):
            finetune(clips, tmp_path / task, tiny_params.finetune, task=task, progress=False,
                     encoder_spec=as_dict(tiny_params.pretrain.encoder))
        assert not (tmp_path / task / "runs").exists()


def test_labelled_videos_take_every_main_plane_even_at_the_smallest_fraction():
    from sonossl.config import FinetuneParams
    from sonossl.train.finetune import labelled_videos, labelling_plan, video_order, video_strata

    bg = ["background"] * 6
    videos = {i: ("train", bg + ["abdomen"] * 3) for i in range(10)}  # abdomen sweeps are common
    videos.update({10: ("train", bg + ["head"] * 2), 11: ("train", bg + ["heart"] * 2 + ["femur"]),
                   12: ("train", bg), 13: ("train", [None] * 4), 14: ("val", bg + ["head"] * 5)})
    index = _index(videos)
    strata = video_strata(index)
    # the main label ignores background, ties break alphabetically, a video without labels is its own stratum
    assert strata[0] == "abdomen" and strata[10] == "head" and strata[11] == "heart"
    assert strata[12] == "background" and strata[13] == "unlabelled" and 14 not in strata
    order, floor = labelling_plan(index, FinetuneParams(seed=3))
    assert floor == 5 and sorted(order) == list(range(14)) and order == video_order(index, 3)
    smallest = labelled_videos(order, 0.05, floor)
    assert {strata[v] for v in smallest} == {"abdomen", "head", "heart", "background", "unlabelled"}
    assert labelled_videos(order, 0.5, floor) == order[:7] and smallest == order[:5]  # nested prefixes
    assert labelled_videos(order, 1.0, floor) == order
    assert video_order(index, 4) != order  # another seed, another order
    _, floor = labelling_plan(index, FinetuneParams(every_main_label=False))
    assert floor == 1 and len(labelled_videos(order, 0.05, floor)) == 1
    with pytest.raises(ValueError, match="label fraction 0 must be in"):
        labelled_videos(order, 0, floor)


class _TwoLayers:
    """A toy TrainTask: a 'body' and a 'head' layer, with the body in its own parameter group."""

    def __init__(self, body_scale: float, groups: str = "both"):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        self.body_scale, self.groups = body_scale, groups

    def param_groups(self):
        body = {"params": list(self.model[0].parameters()), "lr_scale": self.body_scale}
        head = {"params": list(self.model[1].parameters()), "lr_scale": 1.0}
        return [body, head] if self.groups == "both" else [head]

    def steps_per_epoch(self, world):
        return 5

    def batches(self, epoch, rank, world, device):
        gen = torch.Generator().manual_seed(epoch)
        for _ in range(5):
            yield torch.randn(8, 4, generator=gen), torch.randint(2, (8,), generator=gen)

    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y), {}

    def validate(self, model, device):
        return {}


def test_parameter_groups_train_at_their_own_learning_rate(tmp_path):
    from sonossl.train.loop import LoopParams, fit

    moved = {}
    for scale in (1.0, 1e-4):
        task = _TwoLayers(scale)
        before = [p.detach().clone() for p in task.model.parameters()]
        fit(task, tmp_path / str(scale), LoopParams(epochs=1, lr=1e-2, warmup_epochs=0), progress=False, live=False)
        moved[scale] = [float((p.detach() - b).abs().max()) for p, b in zip(task.model.parameters(), before)]
    body, head = slice(0, 2), slice(2, 4)
    assert max(moved[1e-4][body]) < 1e-3 * min(moved[1.0][body])  # the scaled group barely moves
    assert moved[1e-4][head] == pytest.approx(moved[1.0][head], rel=0.5)  # the head trains as before
    with pytest.raises(ValueError, match="exactly one group"):  # a parameter left out of every group
        fit(_TwoLayers(1.0, groups="head"), tmp_path / "bad", LoopParams(epochs=1, lr=1e-2), progress=False, live=False)
    with pytest.raises(ValueError, match="lr_scale must be positive"):
        fit(_TwoLayers(0.0), tmp_path / "zero", LoopParams(epochs=1, lr=1e-2), progress=False, live=False)


class _Scripted(_TwoLayers):
    """A toy task whose validation scores follow a script, one per epoch."""

    def __init__(self, scores):
        super().__init__(1.0)
        self.scores, self.validated = list(scores), 0

    def validate(self, model, device):
        self.validated += 1
        return {"score": self.scores[self.validated - 1]}


def test_early_stopping_ends_after_patience_epochs_without_a_better_score_and_stays_stopped(tmp_path):
    from sonossl.train.loop import LoopParams, fit, load_checkpoint

    scores = [0.2, 0.5, 0.4, 0.5, 0.3, 0.9, 0.9, 0.9]  # best at epoch 2, then two epochs not better (a tie is not)
    params = LoopParams(epochs=8, lr=1e-2, select="val_score", patience=2)
    res = fit(_Scripted(scores), tmp_path / "a", params, progress=False, live=False)
    assert [e["epoch"] for e in res.history] == [1, 2, 3, 4] and res.best["epoch"] == 2 and res.stopped_early
    assert load_checkpoint(tmp_path / "a/checkpoints/best.pt")["epoch"] == 2

    again = _Scripted(scores)  # rerun with --resume: nothing more to train, the stop is kept
    res2 = fit(again, tmp_path / "a", params, resume=True, progress=False, live=False)
    assert again.validated == 0 and res2.stopped_early and len(res2.history) == 4 and res2.best["epoch"] == 2

    whole = fit(_Scripted(scores), tmp_path / "b", dataclasses.replace(params, patience=0), progress=False, live=False)
    assert len(whole.history) == 8 and whole.best["epoch"] == 6 and not whole.stopped_early
    late = fit(_Scripted(scores[:5]), tmp_path / "c", dataclasses.replace(params, epochs=5, patience=3),
               progress=False, live=False)  # patience not spent before the last epoch: a full run
    assert len(late.history) == 5 and not late.stopped_early
    unselected = fit(_Scripted(scores), tmp_path / "d", dataclasses.replace(params, select=None), progress=False,
                     live=False)  # no metric to watch: patience does nothing
    assert len(unselected.history) == 8
    # a NaN score (a diverged validation) is the worst, not a best that nothing after it can beat
    nan_first = fit(_Scripted([math.nan, 0.3, 0.2, 0.1]), tmp_path / "e", params, progress=False, live=False)
    assert nan_first.best["epoch"] == 2 and load_checkpoint(tmp_path / "e/checkpoints/best.pt")["epoch"] == 2


def test_a_run_killed_before_its_best_pt_was_written_writes_it_when_resumed(tmp_path):
    """last.pt is written before best.pt: killed between the two, the best epoch is the last one finished, and the
    resumed run writes best.pt from its weights, so best.pt is the epoch history names (not an older one)."""
    from sonossl.train.loop import LoopParams, fit, load_checkpoint

    scores = [0.2, 0.5, 0.4, 0.3]
    params = LoopParams(epochs=4, lr=1e-2, select="val_score")
    whole = fit(_Scripted(scores), tmp_path / "whole", params, progress=False, live=False)
    assert whole.best["epoch"] == 2
    best = tmp_path / "cut/checkpoints/best.pt"
    fit(_Scripted(scores), tmp_path / "cut", dataclasses.replace(params, stop_after=1), progress=False, live=False)
    epoch_1 = best.read_bytes()
    fit(_Scripted(scores[1:]), tmp_path / "cut", dataclasses.replace(params, stop_after=2), resume=True,
        progress=False, live=False)  # each _Scripted scores from the first epoch it validates
    best.write_bytes(epoch_1)  # as if killed after epoch 2's last.pt, before its best.pt
    resumed = fit(_Scripted(scores[2:]), tmp_path / "cut", params, resume=True, progress=False, live=False)
    assert resumed.best["epoch"] == 2
    kept, expected = load_checkpoint(best), load_checkpoint(tmp_path / "whole/checkpoints/best.pt")
    assert kept["epoch"] == 2 and kept["entry"] == expected["entry"]
    assert all(torch.equal(kept["model"][k], v) for k, v in expected["model"].items())

    # a best.pt of the same epoch number left by another run (other data or parameters: another run id) is no
    # stand-in for this run's: it is replaced too
    other = tmp_path / "other/checkpoints/best.pt"
    stranger = _Scripted([0.1, 0.9])
    torch.nn.init.constant_(stranger.model[0].weight, 0.3)  # other weights than this run's
    fit(stranger, tmp_path / "other", dataclasses.replace(params, stop_after=2), progress=False, live=False,
        run_id="other")
    assert load_checkpoint(other)["epoch"] == 2
    fit(_Scripted(scores), tmp_path / "run", dataclasses.replace(params, stop_after=2), progress=False, live=False,
        run_id="this")
    best = tmp_path / "run/checkpoints/best.pt"
    best.write_bytes(other.read_bytes())  # killed before its own epoch-2 best.pt, beside an old run's epoch 2
    fit(_Scripted(scores[2:]), tmp_path / "run", params, resume=True, progress=False, live=False, run_id="this")
    kept = load_checkpoint(best)
    assert kept["run_id"] == "this" and all(torch.equal(kept["model"][k], v) for k, v in expected["model"].items())


def test_stop_after_trains_the_first_epochs_of_the_planned_schedule(tmp_path):
    """A refit repeats the epochs a validated run chose: ``stop_after=2`` of ``epochs=4`` gives the weights the 4-epoch
    run had after its second epoch, not those of a 2-epoch schedule (whose rate decays sooner)."""
    from sonossl.train.loop import LoopParams, fit, load_checkpoint

    params = LoopParams(epochs=4, lr=1e-2, warmup_epochs=1)
    fit(_TwoLayers(1.0), tmp_path / "short", dataclasses.replace(params, epochs=2), progress=False, live=False)
    short = load_checkpoint(tmp_path / "short/checkpoints/last.pt")["model"]  # a 2-epoch schedule

    class Recorder(_TwoLayers):  # keeps the weights after epoch 2 of the planned 4
        def validate(self, model, device):
            self.after = getattr(self, "after", []) + [{k: v.clone() for k, v in model.state_dict().items()}]
            return {}

    full = Recorder(1.0)
    fit(full, tmp_path / "four", params, progress=False, live=False)
    stopped = _TwoLayers(1.0)
    res = fit(stopped, tmp_path / "two", dataclasses.replace(params, stop_after=2), progress=False, live=False)
    assert [e["epoch"] for e in res.history] == [1, 2] and not res.stopped_early
    kept = load_checkpoint(tmp_path / "two/checkpoints/best.pt")
    assert kept["epoch"] == 2
    for k, v in full.after[1].items():
        assert torch.equal(kept["model"][k], v)  # bit for bit the 4-epoch run after its epoch 2
    assert any(not torch.equal(kept["model"][k], short[k]) for k in short)  # not a 2-epoch schedule
    res = fit(_TwoLayers(1.0), tmp_path / "two", dataclasses.replace(params, stop_after=2), resume=True,
              progress=False, live=False)
    assert len(res.history) == 2  # resumed after its last epoch: nothing more to do
    with pytest.raises(ValueError, match="stop_after: must be 0"):
        fit(_TwoLayers(1.0), tmp_path / "bad", dataclasses.replace(params, stop_after=-1), progress=False, live=False)


def test_ema_validates_and_keeps_the_moving_average_of_the_weights_and_resumes_it(tmp_path):
    """``ema``: the raw weights train as without it; after step t the average moves towards them by
    1 - min(decay, (1 + t) / (10 + t)); validation sees the average, best.pt and the model end as it, last.pt keeps
    both, and a run resumed after epoch 2 ends with the same average as one never stopped."""
    from sonossl.config import FinetuneParams
    from sonossl.train.finetune import finetune_loop_params
    from sonossl.train.loop import LoopParams, WeightAverage, fit, load_checkpoint

    class Recorder(_TwoLayers):  # the raw weights after every step, and what each validation saw
        def loss(self, model, batch):
            now = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.steps = getattr(self, "steps", []) + [now]
            return super().loss(model, batch)

        def validate(self, model, device):
            self.seen = getattr(self, "seen", []) + [{k: v.clone() for k, v in model.state_dict().items()}]
            return {"score": 0.0}

    assert finetune_loop_params(FinetuneParams(ema=0.8), 3, None).ema == 0.8  # every fine-tune passes it on
    params = LoopParams(epochs=3, lr=1e-2, warmup_epochs=0, ema=0.8)
    fit(Recorder(1.0), tmp_path / "plain", dataclasses.replace(params, ema=0.0), progress=False, live=False)
    task = Recorder(1.0)
    fit(task, tmp_path / "ema", params, progress=False, live=False)
    raw = task.steps[1:] + [load_checkpoint(tmp_path / "ema/checkpoints/last.pt")["model"]]  # after steps 1..15
    plain = load_checkpoint(tmp_path / "plain/checkpoints/last.pt")["model"]
    assert all(torch.equal(plain[k], v) for k, v in raw[-1].items())  # the average does not change the training
    expected = {k: v.clone() for k, v in task.steps[0].items()}  # the weights before the first step
    for t, now in enumerate(raw, start=1):
        keep = min(0.8, (1 + t) / (10 + t))
        expected = {k: keep * expected[k] + (1 - keep) * now[k] for k in expected}
        if t % 5 == 0:  # the end of an epoch: validated
            for k, v in task.seen[t // 5 - 1].items():
                assert torch.allclose(v, expected[k], atol=1e-6), (t, k)
    best = load_checkpoint(tmp_path / "ema/checkpoints/best.pt")["model"]
    for k, v in expected.items():
        assert torch.allclose(best[k], v, atol=1e-6) and torch.equal(task.model.state_dict()[k], best[k])
        assert not torch.allclose(raw[-1][k], v, atol=1e-6)  # the average is not the raw weights
    assert load_checkpoint(tmp_path / "ema/checkpoints/last.pt")["average"]["updates"] == 15

    fit(Recorder(1.0), tmp_path / "cut", dataclasses.replace(params, stop_after=2), progress=False, live=False)
    fit(Recorder(1.0), tmp_path / "cut", params, resume=True, progress=False, live=False)
    resumed = load_checkpoint(tmp_path / "cut/checkpoints/best.pt")["model"]
    assert all(torch.equal(resumed[k], best[k]) for k in best)
    with pytest.raises(ValueError, match="ema: a decay between 0 and 1"):
        WeightAverage(task.model, 1.0)
    with pytest.raises(CheckpointError, match="plain/checkpoints/last.pt: holds no weight average"):
        fit(Recorder(1.0), tmp_path / "plain", params, resume=True, progress=False, live=False)  # same id, no ema


def test_lp_ft_starts_from_the_linear_probe_and_scales_only_a_pretrained_encoder(tiny_clips, tiny_params, tmp_path):
    """LP-FT: the fine-tune's head starts as the linear probe of its encoder (with a vanishing learning rate it is
    still that probe after training), and only a pretrained encoder gets ``encoder_lr_scale``."""
    from sonossl.config import as_dict
    from sonossl.models.encoder import build_encoder
    from sonossl.train.finetune import _rows, embed, finetune, finetune_classifier, linear_probe, open_labelled

    d = open_labelled(tiny_clips)
    train_rows, val_rows = _rows(d, split="train"), _rows(d, split="val")
    ft = dataclasses.replace(tiny_params.finetune, lr=1e-12, epochs=1, head_init="probe", encoder_lr_scale=0.1)
    torch.manual_seed(0)
    enc = build_encoder(as_dict(tiny_params.pretrain.encoder))
    z = embed(enc, d.frames, np.concatenate([train_rows, val_rows]), torch.device("cpu"))
    probe, _ = linear_probe(z[:len(train_rows)], d.labels[train_rows], z[len(train_rows):], d.labels[val_rows],
                            len(d.classes), ft.probe_c, ft.seed)
    model, info = finetune_classifier(enc, True, d, train_rows, val_rows, ft, tmp_path / "lpft", torch.device("cpu"),
                                      progress=False)
    assert info["head_init"] == "probe" and info["encoder_lr_scale"] == 0.1
    assert torch.allclose(model.head[1].weight, probe.weight, atol=1e-5)
    # scratch trains its encoder at the full rate; a bad head_init or patience names the field
    m = finetune(tiny_clips, tmp_path / "scratch", ft, encoder_spec=as_dict(tiny_params.pretrain.encoder),
                 methods=("finetune",), progress=False)
    assert {r["encoder_lr_scale"] for r in m["runs"]} == {1.0} and {r["head_init"] for r in m["runs"]} == {"probe"}
    with pytest.raises(ValueError, match="finetune.head_init"):
        finetune(tiny_clips, tmp_path / "bad", dataclasses.replace(ft, head_init="zeros"),
                 encoder_spec=as_dict(tiny_params.pretrain.encoder), progress=False)
    with pytest.raises(ValueError, match="finetune.patience"):
        finetune(tiny_clips, tmp_path / "bad", dataclasses.replace(ft, patience=-1),
                 encoder_spec=as_dict(tiny_params.pretrain.encoder), progress=False)
    with pytest.raises(ValueError, match=r"finetune.ema: must be in \[0, 1\)"):
        finetune(tiny_clips, tmp_path / "bad", dataclasses.replace(ft, ema=1.0),
                 encoder_spec=as_dict(tiny_params.pretrain.encoder), progress=False)


def test_layer_wise_decay_slows_the_early_stages_of_a_pretrained_encoder_only(tiny_clips, tiny_params, tmp_path):
    """``encoder_lr_decay``: stage k of n (stem 0) at scale * decay^(n-k), the head at the full rate, every parameter
    in one group; in a real fine-tune the first stage moves less than the last; scratch keeps one rate."""
    from sonossl.config import as_dict
    from sonossl.models.downstream import PlaneClassifier
    from sonossl.models.encoder import build_encoder
    from sonossl.train.finetune import PlaneTask, _rows, finetune, finetune_classifier, open_labelled

    ft = dataclasses.replace(tiny_params.finetune, encoder_lr_decay=0.5, encoder_lr_scale=0.1, epochs=1)
    def groups_of(model, scale, decay):
        none = np.zeros(0, dtype=np.int64)
        return PlaneTask(model, None, none, none, none, ft, 3, encoder_lr_scale=scale,
                         encoder_lr_decay=decay).param_groups()

    resnet = PlaneClassifier(build_encoder({"name": "resnet18", "width": 8}), 3)
    groups = groups_of(resnet, 0.1, 0.5)
    assert [g["lr_scale"] for g in groups] == pytest.approx([0.1 * 0.5 ** k for k in (4, 3, 2, 1, 0)] + [1.0])
    assert sorted(id(q) for g in groups for q in g["params"]) == sorted(id(q) for q in resnet.parameters())
    assert len(groups_of(resnet, 0.1, 1.0)) == 2  # no decay: one encoder group, as before
    small = PlaneClassifier(build_encoder(as_dict(tiny_params.pretrain.encoder)), 3)  # small_cnn: no stem weights
    assert [g["lr_scale"] for g in groups_of(small, 1.0, 0.5)] == pytest.approx([0.125, 0.25, 0.5, 1.0, 1.0])

    d = open_labelled(tiny_clips)
    torch.manual_seed(0)
    enc = build_encoder(as_dict(tiny_params.pretrain.encoder))
    before = [copy.deepcopy(s.state_dict()) for s in enc.stages]
    model, info = finetune_classifier(enc, True, d, _rows(d, split="train"), _rows(d, split="val"),
                                      dataclasses.replace(ft, encoder_lr_scale=1.0, encoder_lr_decay=0.125),
                                      tmp_path / "decay", torch.device("cpu"), progress=False)
    assert info["encoder_lr_decay"] == 0.125

    def moved(k: int) -> float:
        after = model.encoder.stages[k].state_dict()
        return float(np.mean([(after[n].float() - w.float()).abs().mean() for n, w in before[k].items()
                              if n.endswith("weight")]))

    assert moved(0) < moved(3) / 10  # 0.125^3: the first stage at 1/512 of the last stage's rate
    m = finetune(tiny_clips, tmp_path / "scratch", ft, encoder_spec=as_dict(tiny_params.pretrain.encoder),
                 methods=("finetune",), progress=False)
    assert {r["encoder_lr_decay"] for r in m["runs"]} == {1.0}
    with pytest.raises(ValueError, match=r"finetune.encoder_lr_decay: must be in \(0, 1\]"):
        finetune(tiny_clips, tmp_path / "bad", dataclasses.replace(ft, encoder_lr_decay=1.5),
                 encoder_spec=as_dict(tiny_params.pretrain.encoder), progress=False)
    assert not (tmp_path / "bad").exists()


def test_pool_stages_reaches_the_probe_the_fine_tune_and_the_served_model(tiny_clips, tiny_params, tmp_path):
    """``finetune.pool_stages``: probe and fine-tune heads on the last stages pooled; model.pt, the bundle and the
    model card keep it, and the exported model predicts what the fine-tuned classifier does."""
    from sonossl.config import as_dict
    from sonossl.export import export, load_bundle
    from sonossl.models.encoder import build_encoder
    from sonossl.train.finetune import finetune

    spec = as_dict(tiny_params.pretrain.encoder)
    ft = dataclasses.replace(tiny_params.finetune, pool_stages=2, fractions=[1.0], saliency_fractions=[1.0])
    width = sum(build_encoder(spec).channels[-2:])
    m = finetune(tiny_clips, tmp_path / "ft/scratch-planes", ft, encoder_spec=spec, progress=False)
    assert m["params"]["pool_stages"] == 2
    model = _plane_model(tmp_path / "ft/scratch-planes/model.pt")
    assert model.pool_stages == 2 and model.head[1].in_features == width
    finetune(tiny_clips, tmp_path / "ft/scratch-saliency", ft, task="saliency", encoder_spec=spec, progress=False)
    card = export(tiny_clips, tmp_path / "ft", tmp_path / "export", tiny_params)
    assert card["planes"]["pool_stages"] == 2
    bundle = load_bundle(tmp_path / "export")
    frames = np.load(tiny_clips / "frames.npy")[:6]
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(frames).float().div(255).unsqueeze(1)
        expected = torch.softmax(model(x), 1).numpy()
        embedding = model.encoder(x).numpy()
    out = bundle.predict(frames)
    assert np.allclose(out["probs"], expected, atol=1e-5)
    assert np.allclose(bundle.reduce(embedding), out["embedding_reduced"], atol=1e-4)
    for bad, match in ((0, "finetune.pool_stages: must be >= 1"), (9, "finetune.pool_stages=9: the small_cnn")):
        with pytest.raises(ValueError, match=match):
            finetune(tiny_clips, tmp_path / "bad", dataclasses.replace(ft, pool_stages=bad), encoder_spec=spec,
                     progress=False)
    assert not (tmp_path / "bad").exists()


def test_resume_never_continues_a_scratch_fine_tune_of_another_network(tiny_clips, tiny_params, tmp_path, caplog):
    """A scratch run is defined by its network too: the same parameters with another ``encoder.init`` (same shapes)
    start over instead of "resuming" the finished run of the other initialisation and keeping its weights."""
    from sonossl.config import as_dict
    from sonossl.train.finetune import finetune

    ft = dataclasses.replace(tiny_params.finetune, fractions=[1.0])
    spec = as_dict(tiny_params.pretrain.encoder)
    finetune(tiny_clips, tmp_path / "ft", ft, encoder_spec=spec, methods=("finetune",), progress=False)
    caplog.set_level("INFO")
    finetune(tiny_clips, tmp_path / "ft", ft, encoder_spec=spec, methods=("finetune",), resume=True, progress=False)
    assert "resuming after epoch 2 of 2" in caplog.text  # the same network: continued (nothing left to do)
    caplog.clear()
    finetune(tiny_clips, tmp_path / "ft", ft, encoder_spec={**spec, "init": "torchvision"}, methods=("finetune",),
             resume=True, progress=False)
    assert "belongs to another run" in caplog.text and "resuming" not in caplog.text


def test_an_independent_test_set_is_scored_whole_and_must_fit_the_training_clips(tiny_clips, tiny_test_clips,
                                                                                  tiny_params, tmp_path):
    """``test_clips``: every labelled frame of another clip dataset is scored, with the training dataset's class
    indices, and ``metrics.json`` says which frames the test scores come from. A dataset that is the training one,
    shares its patients or has other frame sizes fails naming it."""
    from sonossl.config import as_dict
    from sonossl.data.clips import load_clip_dataset, preprocess
    from sonossl.evaluate.classification_metrics import classification_report
    import shutil

    import pandas as pd

    from sonossl.train.finetune import open_labelled, open_test_set, predict, finetune

    ft, spec = tiny_params.finetune, as_dict(tiny_params.pretrain.encoder)
    m = finetune(tiny_clips, tmp_path / "probe", ft, encoder_spec=spec, fractions=[1.0], methods=("probe",),
                 test_clips=tiny_test_clips, progress=False)
    test = load_clip_dataset(tiny_test_clips)
    assert m["test_set"] == {"clips": str(tiny_test_clips), "data_version": test.version, "split": "all",
                             "videos": test.index.video_idx.nunique(), "frames": len(test)}
    # the score is that of the saved model on all of the test set's frames, its labels mapped to the model's classes
    d, t = open_labelled(tiny_clips), open_labelled(tiny_test_clips)
    model = _plane_model(tmp_path / "probe/model.pt")
    rows = np.arange(len(t.labels))
    # (the tiny training sweeps show three classes, the tiny test sweeps others too: those count as errors)
    classes = d.classes + sorted(set(t.classes) - set(d.classes))
    assert len(classes) > len(d.classes)
    truth = np.array([classes.index(t.classes[i]) for i in t.labels])
    expect = classification_report(truth, predict(model, t.frames, rows, torch.device("cpu")).argmax(1).numpy(),
                                   classes)
    assert m["runs"][0]["test"]["macro_f1"] == expect["macro_f1"] and m["runs"][0]["test"]["classes"] == classes
    assert sum(c["support"] for c in m["runs"][0]["test"]["per_class"].values()) == len(test)
    # without test_clips: the test split, as before
    assert open_test_set(d).info["split"] == "test" and open_test_set(d).info["frames"] == int((d.split == "test").sum())
    s = finetune(tiny_clips, tmp_path / "saliency", dataclasses.replace(ft, saliency_epochs=1), task="saliency",
                 encoder_spec=spec, fractions=[1.0], test_clips=tiny_test_clips, progress=False)
    assert s["runs"][0]["test"]["n"] == len(test)

    with pytest.raises(ValueError, match="is the training clip dataset"):
        open_test_set(d, tiny_clips)
    raw = tiny_clips.parent / "raw"  # the training sweeps again, split with another seed: the same patients
    preprocess(raw, tmp_path / "again", dataclasses.replace(tiny_params.preprocess, seed=7), progress=False)
    with pytest.raises(ValueError, match=r"again: independent test set: patient\(s\) \['fetus-0-"):
        open_test_set(d, tmp_path / "again")
    # Without patient ids, videos are compared by their bytes, not by their paths: the training and test sweeps
    # share file names (videos/sweep_000.mp4...) but not contents; the training sweeps themselves are refused.
    anonymous = {}
    for name, raw in (("train", tiny_clips.parent / "raw"), ("test", tiny_test_clips.parent / "raw")):
        shutil.copytree(raw, tmp_path / f"{name}-raw")
        listing = pd.read_csv(tmp_path / f"{name}-raw/labels.csv").drop(columns="patient_id")
        listing.to_csv(tmp_path / f"{name}-raw/labels.csv", index=False)
        anonymous[name] = preprocess(tmp_path / f"{name}-raw", tmp_path / f"{name}-anon", tiny_params.preprocess,
                                     progress=False).out_dir
    d_anon = open_labelled(anonymous["train"])
    assert open_test_set(d_anon, anonymous["test"]).info["videos"] == test.index.video_idx.nunique()
    with pytest.raises(ValueError, match=r"again: independent test set: video\(s\) \['videos/sweep_000.mp4'"):
        open_test_set(d_anon, tmp_path / "again")
    preprocess(tiny_test_clips.parent / "raw", tmp_path / "small", dataclasses.replace(tiny_params.preprocess,
                                                                                      frame_size=24), progress=False)
    with pytest.raises(ValueError, match=r"small: independent test set: frames of \(24, 24\) pixels"):
        open_test_set(d, tmp_path / "small")


def _plane_model(path: Path):
    from sonossl.export import plane_model

    ck = load_checkpoint(path)
    return plane_model(ck, len(ck["classes"]))


def test_row_weights_draw_training_frames_in_proportion_and_balance_the_classes_by_weight(tiny_params):
    """``row_weights``: frames are drawn with those probabilities (a zero-weight row never), the class-balanced loss
    counts each row by its weight, and weights that are not one finite non-negative value per row are refused."""
    from sonossl.train.finetune import PlaneTask, balanced_weights

    frames = torch.arange(6, dtype=torch.uint8)[:, None, None].expand(6, 8, 8).contiguous()
    labels = np.array([0, 0, 0, 0, 1, 2])
    rows, weights = np.arange(6), np.array([1.0, 1.0, 0.0, 2.0, 2.0, 2.0])
    ft = dataclasses.replace(tiny_params.finetune, batch_size=64, frames_per_epoch=64 * 50)
    task = PlaneTask(torch.nn.Identity(), frames, labels, rows, rows[:0], ft, 3, row_weights=weights)
    drawn = torch.cat([r for e in range(2) for _, r, _ in task.batches(e, 0, 1, torch.device("cpu"))]).numpy()
    share = np.bincount(drawn, minlength=6) / len(drawn)
    assert share[2] == 0 and share == pytest.approx(weights / weights.sum(), abs=0.02)
    # class 0 holds weight 4 of 8, classes 1 and 2 weight 2 each: weights 8/(3*4), 8/(3*2), 8/(3*2)
    assert task.weights.tolist() == pytest.approx([2 / 3, 4 / 3, 4 / 3])
    assert balanced_weights(labels, 4).tolist() == pytest.approx([0.375, 1.5, 1.5, 0.0])  # unweighted, as before
    uniform = PlaneTask(torch.nn.Identity(), frames, labels, rows, rows[:0], ft, 3)
    assert set(torch.cat([r for _, r, _ in uniform.batches(0, 0, 1, torch.device("cpu"))]).tolist()) == set(range(6))
    for bad in (weights[:5], -weights, np.zeros(6), np.full(6, np.nan)):
        with pytest.raises(ValueError, match="row_weights: 6 finite non-negative weights"):
            PlaneTask(torch.nn.Identity(), frames, labels, rows, rows[:0], ft, 3, row_weights=bad)


def test_a_weighted_linear_probe_is_the_probe_on_rows_repeated_by_their_weights():
    """``linear_probe(sample_weight=...)``: weight 2 counts as the row given twice, weight 0 as the row left out, in
    the standardisation, the class balance and the fit."""
    from sonossl.train.finetune import linear_probe

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [30, 12, 6])
    z = rng.normal(size=(len(y), 5)) + y[:, None] * np.array([1.0, -0.5, 0.0, 0.3, 0.0])
    w = rng.integers(0, 4, size=len(y)).astype(np.float64)
    w[[0, 30, 42]] = 1  # every class keeps a row
    repeated = np.repeat(np.arange(len(y)), w.astype(int))
    x = torch.tensor(z, dtype=torch.float32)
    for n_classes in (3, 4):  # 4: a class no training row has (it used to change the weighted probe's strength)
        weighted, info_w = linear_probe(z, y, z, y, n_classes, [0.1, 10.0], 0, sample_weight=w)
        plain, info_p = linear_probe(z[repeated], y[repeated], z, y, n_classes, [0.1, 10.0], 0)
        assert info_w == info_p
        assert torch.allclose(weighted(x), plain(x), atol=2e-3), n_classes
    assert not torch.allclose(weighted(x), linear_probe(z, y, z, y, 4, [info_p["C"]], 0)[0](x), atol=2e-3)


def test_a_training_summary_left_empty_by_a_kill_does_not_stop_the_resume(tmp_path):
    """dvclive rewrites live/metrics.json in place every epoch; a kill -9 in that instant left it empty, and the
    resumed run failed on it ("Expecting value: line 1 column 1"), once in a `make test` run of the kill -9 test."""
    from sonossl.train.loop import LoopParams, fit

    fit(_TwoLayers(1.0), tmp_path / "run", LoopParams(epochs=3, lr=1e-2, stop_after=2), progress=False)
    summary = tmp_path / "run/live/metrics.json"
    assert summary.is_file()
    summary.write_bytes(b"")
    res = fit(_TwoLayers(1.0), tmp_path / "run", LoopParams(epochs=3, lr=1e-2), resume=True, progress=False)
    assert res.resumed_from == 2 and [e["epoch"] for e in res.history] == [1, 2, 3]
    assert json.loads(summary.read_text())["step"] == 2  # written again: the history, then the resumed epoch


def test_saliency_targets_follow_their_frames_through_shift_zoom_and_flip(tiny_params):
    """The fine-tune moves each gaze map exactly as its frame (``augment_frames``' shift, zoom and flip), at the
    map's own resolution, and it stays a distribution: frames that are their maps enlarged 4x keep their bright spot
    where the target's mass is. Before, only the flip followed, and the spot sat up to 0.08 (normalised
    coordinates, the image 2 wide) from the target's centre. What leaves the view is dropped, not repeated from the
    edge, and the targets are the same under the loop's bfloat16 autocast."""
    from sonossl.train.finetune import SaliencyTask

    gen = torch.Generator().manual_seed(0)
    n, m = 32, 16
    centre = (torch.rand(n, 2, generator=gen) - 0.5) * 1.2  # normalised (x, y), away from the edges
    axis = (torch.arange(m) + 0.5) / m * 2 - 1
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    maps = torch.exp(-((xx - centre[:, :1, None]) ** 2 + (yy - centre[:, 1:, None]) ** 2) / (2 * 0.12**2))
    maps = maps / maps.flatten(1).sum(1)[:, None, None]
    big = F.interpolate(maps[:, None], scale_factor=4, mode="bilinear", align_corners=False)[:, 0]
    frames = (255 * big / big.flatten(1).amax(1)[:, None, None]).round().to(torch.uint8)
    rows = np.arange(n)
    ft = dataclasses.replace(tiny_params.finetune, batch_size=n, frames_per_epoch=4 * n)
    task = SaliencyTask(torch.nn.Identity(), frames, maps, rows, rows[:0], ft)

    def mass_centre(p: torch.Tensor) -> torch.Tensor:  # (B, H, W) -> (B, 2) normalised (x, y)
        p = p / p.flatten(1).sum(1)[:, None, None]
        a = (torch.arange(p.shape[-1]) + 0.5) / p.shape[-1] * 2 - 1
        return torch.stack([(p.sum(1) * a).sum(1), (p.sum(2) * a).sum(1)], 1)

    moved = 0.0
    for x, drawn, theta in task.batches(0, 0, 1, torch.device("cpu")):
        target = task.targets(drawn, theta)
        assert target.shape == (n, m, m) and target.flatten(1).sum(1) == pytest.approx(torch.ones(n), abs=1e-5)
        spot = (x[:, 0] - x[:, 0].flatten(1).amin(1)[:, None, None]).clamp_min(0) ** 4  # the peak, not the offset
        assert (mass_centre(spot) - mass_centre(target)).abs().max() < 0.02
        moved = max(moved, float((mass_centre(target) - mass_centre(maps[drawn])).abs().max()))
    assert moved > 0.05  # the augmentation did move the maps

    uniform = SaliencyTask(torch.nn.Identity(), frames, torch.full((n, m, m), 1 / m**2), rows, rows[:0], ft)
    right = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]]).expand(n, 2, 3)  # the view a quarter to the right
    target = uniform.targets(torch.arange(n), right)
    assert target[:, :, -m // 4:].sum() == 0  # off the map: no gaze (an edge repeated would put 1/4 of it there)
    assert target[:, :, : m - m // 4 - 1] == pytest.approx(torch.full((n, m, m - m // 4 - 1), 4 / (3 * m**2)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = task.targets(drawn, theta)
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, task.targets(drawn, theta))


def test_a_run_stopped_and_resumed_ends_bit_for_bit_as_one_never_stopped(tiny_clips, tiny_params, tmp_path):
    """``last.pt`` holds the weights, the optimizer state, the history and the best epoch, and every batch comes
    from generators seeded per epoch (and rank), never from the global RNG. So a real pretext run and a real plane
    fine-tune (augmented frames, validation selecting the best epoch), stopped after epoch 2 and resumed in a new
    task with the global RNG elsewhere, end with the weights, optimizer state, history and best epoch of runs never
    stopped."""
    from sonossl.config import as_dict
    from sonossl.data.clips import load_clip_dataset
    from sonossl.models.downstream import PlaneClassifier
    from sonossl.models.encoder import build_encoder
    from sonossl.train.finetune import PlaneTask, _rows, finetune_loop_params, open_labelled
    from sonossl.train.loop import fit
    from sonossl.train.pretrain import PretextTask, frames_tensor, loop_params

    data, d = load_clip_dataset(tiny_clips), open_labelled(tiny_clips)
    split = data.index.split.to_numpy()
    pt = dataclasses.replace(tiny_params.pretrain, epochs=3)
    ft = dataclasses.replace(tiny_params.finetune, epochs=3, patience=0)

    def pretext() -> PretextTask:
        torch.manual_seed(0)
        return PretextTask(frames_tensor(data), data.index.video_idx.to_numpy(), split == "train", split == "val",
                           pt, "both-parallel")

    def plane() -> PlaneTask:
        torch.manual_seed(0)
        model = PlaneClassifier(build_encoder(as_dict(pt.encoder)), len(d.classes))
        return PlaneTask(model, d.frames, d.labels, _rows(d, split="train"), _rows(d, split="val"), ft,
                         len(d.classes))

    def run(make, out, loop, resume=False, global_seed=0):
        task = make()
        torch.manual_seed(global_seed)  # what the global RNG holds while training
        return fit(task, out, loop, resume=resume, progress=False, live=False)

    for name, make, loop in (("pretext", pretext, loop_params(pt)),
                             ("plane", plane, finetune_loop_params(ft, ft.epochs, "val_macro_f1"))):
        whole = run(make, tmp_path / name / "whole", loop)
        run(make, tmp_path / name / "cut", dataclasses.replace(loop, stop_after=2))
        resumed = run(make, tmp_path / name / "cut", loop, resume=True, global_seed=12345)
        assert resumed.resumed_from == 2 and [e["epoch"] for e in resumed.history] == [1, 2, 3]
        assert resumed.history == whole.history and resumed.best == whole.best, name
        for file in ("last.pt", "best.pt"):
            a, b = (load_checkpoint(tmp_path / name / run_dir / "checkpoints" / file) for run_dir in ("whole", "cut"))
            assert a["epoch"] == b["epoch"] and a["model"].keys() == b["model"].keys()
            assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), (name, file)
        a, b = (load_checkpoint(tmp_path / name / run_dir / "checkpoints/last.pt")["optimizer"]["state"]
                for run_dir in ("whole", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i]), name


@pytest.mark.parametrize("section, changes, message", [
    ("finetune", {"epochs": 0}, "finetune.epochs: must be at least 1, got 0"),
    ("finetune", {"batch_size": 0}, "finetune.batch_size: must be at least 1, got 0"),
    ("finetune", {"probe_c": []}, "finetune.probe_c: must be a non-empty list of positive numbers, got []"),
    ("finetune", {"fractions": []}, "finetune.fractions: must be a non-empty list of distinct fractions in (0, 1]"),
    ("finetune", {"saliency_fractions": [0.2, 1.5]}, "finetune.saliency_fractions: must be a non-empty list"),
    ("finetune", {"lr": 0.0}, "finetune.lr: must be positive, got 0.0"),
    ("pretrain", {"batch_size": 0}, "pretrain.batch_size: must be at least 1, got 0"),
    ("pretrain", {"k": 1}, "pretrain.k: must be at least 3 (2 frames have a single order up to reversal"),
    ("pretrain", {"n_permutations": 13}, "pretrain.n_permutations: must be null or between 2 and 12 for k=4, got 13"),
    ("pretrain", {"warmup_epochs": -1.0}, "pretrain.warmup_epochs: must be 0 or more, got -1.0"),
    ("pretrain", {"max_shift": -2.0}, "pretrain.max_shift: must be 0 or more, got -2.0"),
    ("crossval", {"folds": 1}, "crossval.folds: must be at least 2, got 1"),
    ("crossval", {"frames_per_video": 0}, "crossval.frames_per_video: must be at least 1, got 0"),
])
def test_a_setting_out_of_range_fails_before_any_work_naming_it(tiny_params, tmp_path, section, changes, message):
    """A 0, a negative number or an empty list failed deep inside (a division by zero, sklearn, an empty loop) or,
    for finetune.epochs: 0, loaded an old best.pt; every step checks its settings first and names the one."""
    from sonossl.config import ParamsError
    from sonossl.train.crossval import crossval
    from sonossl.train.finetune import finetune
    from sonossl.train.pretrain import check_pretrain_params

    params = dataclasses.replace(tiny_params, **{section: dataclasses.replace(getattr(tiny_params, section),
                                                                              **changes)})
    with pytest.raises(ParamsError, match=re.escape(message)):
        if section == "finetune":
            finetune(tmp_path / "no-clips", tmp_path / "out", params.finetune)
        elif section == "pretrain":
            check_pretrain_params(params.pretrain)
        else:
            crossval(tmp_path / "no-clips", tmp_path / "out", params)
    assert not (tmp_path / "out").exists()


def test_finetune_and_crossval_refuse_torchrun(tiny_params, tmp_path, monkeypatch):
    """Only pretraining splits batches over ranks; finetune under torchrun trained the same model on every rank."""
    from sonossl.train.crossval import crossval
    from sonossl.train.finetune import finetune

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"finetune runs in one process, not under torchrun \(WORLD_SIZE=2\)"):
        finetune(tmp_path / "no-clips", tmp_path / "out", tiny_params.finetune)
    with pytest.raises(ValueError, match="crossval runs in one process"):
        crossval(tmp_path / "no-clips", tmp_path / "out", tiny_params)


def test_a_resumed_run_s_curves_start_at_epoch_1_whatever_its_live_folder_holds(tmp_path):
    """dvclive's curves are written again from the checkpoint's history when a run resumes: `dvc exp run` removes
    the folder before a rerun (the curves then held only the resumed epochs), and a run resumed after its last
    epoch wrote none (DVC then failed the stage for its missing plots output, at every rerun)."""
    import shutil

    from sonossl.train.loop import LoopParams, fit

    def curve(run) -> list[tuple[str, str]]:
        rows = (tmp_path / run / "live/plots/metrics/val/score.tsv").read_text().splitlines()[1:]
        return [tuple(r.split("\t")) for r in rows]  # step, value

    scores = [0.2, 0.5, 0.4]
    params = LoopParams(epochs=3, lr=1e-2, select="val_score")
    fit(_Scripted(scores), tmp_path / "whole", params, progress=False)
    assert curve("whole") == [("0", "0.2"), ("1", "0.5"), ("2", "0.4")]
    fit(_Scripted(scores), tmp_path / "cut", dataclasses.replace(params, stop_after=1), progress=False)
    shutil.rmtree(tmp_path / "cut/live")  # as dvc exp run leaves it
    fit(_Scripted(scores[1:]), tmp_path / "cut", params, resume=True, progress=False)
    assert curve("cut") == curve("whole")
    assert json.loads((tmp_path / "cut/live/metrics.json").read_text())["step"] == 2
    shutil.rmtree(tmp_path / "cut/live")  # resumed after its last epoch: nothing to train, the curves written again
    (tmp_path / "cut/live").mkdir()
    (tmp_path / "cut/live/metrics.json").write_text("")  # and a metrics.json a kill -9 left empty
    fit(_Scripted([]), tmp_path / "cut", params, resume=True, progress=False)
    assert curve("cut") == curve("whole")
