"""The benchmark scripts whose options build something themselves (tiny profile; the figures are not checked)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sonossl.config import load_params
from sonossl.train.pretrain import transform_set

REPO = Path(__file__).resolve().parents[1]
LABEL_SEEDS = REPO / "benchmarks" / "label_seeds.py"


def test_label_seeds_pretrains_on_a_new_unlabelled_pool(tiny_clips, tiny_test_clips, tmp_path):
    out, kept = tmp_path / "seeds.json", tmp_path / "kept-encoder"
    common = ["--profile", "tiny", "--clips", str(tiny_clips), "--test-clips", str(tiny_test_clips), "--lr", "0.002",
              "--fraction", "1", "--head-init", "probe", "--encoder-lr-scale", "0.1", "--pool-stages", "2",
              "--encoder-lr-decay", "0.5"]
    subprocess.run([sys.executable, str(LABEL_SEEDS), *common, "--seeds", "2", "--pool-videos", "4",
                    "--pool-fps", "5", "--clips-per-epoch", "48", "--pretrain-epochs", "1", "--pretrain-lr", "0.003",
                    "--pretrain-seed", "3", "--pretrain-stride", "3", "--pretrain-crop", "16", "--pretrain-max-shift",
                    "0", "--pretrain-warmup", "0.5", "--encoder-init", "torchvision", "--save-encoder", str(kept),
                    "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    # the kept encoder gives the same draw the same scores, and its record still says how it was built
    subprocess.run([sys.executable, str(LABEL_SEEDS), *common, "--encoder", str(kept), "--first-seed", "1",
                    "--seeds", "1", "--out", str(tmp_path / "again.json")],
                   check=True, capture_output=True, text=True, timeout=600)
    again = json.loads((tmp_path / "again.json").read_text())
    assert result["seeds"] == [0, 1] and again["seeds"] == [1] and again["per_seed"] == result["per_seed"][1:]
    assert again["encoder"]["path"] == str(kept) and again["encoder"]["pool_videos"] == 4
    assert again["encoder"]["pretrain_epochs"] == 1 and again["encoder"]["pretrain_lr"] == 0.003
    assert again["encoder"]["data_version"] == result["encoder"]["data_version"]
    enc = result["encoder"]
    assert enc["path"] is None and enc["pool_videos"] == 4 and enc["pool_seed"] == 2
    assert enc["mode"] == "both-sequential" and enc["epochs"] == 1
    assert enc["pool_fps"] == 5 and enc["clips_per_epoch"] == 48 and enc["pretrain_lr"] == 0.003
    assert enc["pretrain_seed"] == again["encoder"]["pretrain_seed"] == 3
    assert (enc["pretrain_stride"], enc["pretrain_crop"], enc["pretrain_max_shift"]) == (3, 16, 0)
    kept_params = torch.load(kept / "encoder.pt", weights_only=True)["params"]  # what the encoder was built with
    assert (kept_params["stride"], kept_params["crop"], kept_params["max_shift"], kept_params["seed"]) == (3, 16, 0, 3)
    assert enc["pretrain_warmup"] == kept_params["warmup_epochs"] == 0.5
    assert enc["data_version"] != json.loads((tiny_clips / "meta.json").read_text())["version"]
    assert result["lr"] == 0.002 and len(result["per_seed"]) == 2
    test_meta = json.loads((tiny_test_clips / "meta.json").read_text())
    assert result["test_set"]["data_version"] == test_meta["version"] and result["test_set"]["split"] == "all"
    assert result["fraction"] == 1.0 and result["target"] is None  # the target is stated at the smallest fraction
    assert result["head_init"] == "probe" and result["encoder_lr_scale"] == 0.1 and result["pool_stages"] == 2
    assert result["encoder_lr_decay"] == 0.5
    row = result["per_seed"][0]
    assert row["finetune_gain"] == round(row["ssl_finetune"] - row["scratch_finetune"], 4)
    assert {row["ssl_finetune_epoch"], row["scratch_finetune_epoch"]} <= {"1/2", "2/2"}  # tiny: 2 fine-tune epochs
    # --encoder-init: both networks start so (small_cnn's own is pytorch), and a kept encoder's scratch twin too
    assert enc["encoder_init"] == "torchvision" and kept_params["encoder"]["init"] == "torchvision"
    assert torch.load(kept / "encoder.pt", weights_only=True)["encoder"]["init"] == "torchvision"  # its network
    assert result["encoder_spec"] == again["encoder_spec"] == {"name": "small_cnn", "width": 8, "maxpool": True,
                                                               "init": "torchvision"}
    # every run's validation score, and their spread: what choices are compared on
    for r in result["per_seed"]:
        assert all(0 <= r[f"{i}_{m}_val"] <= 1 for i in ("ssl", "scratch") for m in ("finetune", "probe"))
    assert result["ssl_finetune_val"]["min"] == min(r["ssl_finetune_val"] for r in result["per_seed"])


@pytest.mark.parametrize("seed", [0, 1])  # the tiny profile's training and test sweeps
def test_label_seeds_refuses_a_pool_of_the_evaluation_fetuses(tiny_clips, tmp_path, seed):
    proc = subprocess.run([sys.executable, str(LABEL_SEEDS), "--profile", "tiny", "--clips", str(tiny_clips),
                           "--pool-videos", "4", "--pool-seed", str(seed), "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"--pool-seed {seed} is the simulator seed of the training or test sweeps" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_label_seeds_keeps_only_an_encoder_it_built(tmp_path):
    proc = subprocess.run([sys.executable, str(LABEL_SEEDS), "--profile", "tiny", "--save-encoder",
                           str(tmp_path / "kept"), "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--save-encoder: only with --pretrain-epochs, --pretrain-lr" in proc.stderr
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "kept").exists()


def test_label_seeds_pool_keeps_the_time_between_clip_frames(monkeypatch):
    """A pool rendered at another frame rate pretrains with the stride scaled to it (the default profile: 20 frames/s
    and stride 12, so 5 frames/s and stride 3); a profile that resamples every dataset to one rate keeps it.
    ``--pretrain-lr`` alone changes the rate and nothing else of the pipeline's pretraining, ``--pretrain-seed`` the
    seed."""
    monkeypatch.syspath_prepend(str(LABEL_SEEDS.parent))
    bench = importlib.import_module("label_seeds")
    default = load_params(REPO / "params.yaml", "default")
    assert (default.simulate.fps, default.preprocess.fps, default.pretrain.stride) == (20.0, None, 12)

    def args(**given):
        return argparse.Namespace(**dict.fromkeys(bench.BUILD_OPTIONS) | {"pool_seed": 2, "pool_fps": None} | given)

    pre, sim = bench.build_params(args(pretrain_epochs=24, clips_per_epoch=1936, pool_videos=128, pool_fps=5.0),
                                  default)
    assert (sim.videos, sim.seed, sim.fps, sim.height) == (128, 2, 5.0, default.simulate.height)
    assert (pre.stride, pre.epochs, pre.clips_per_epoch, pre.crop) == (3, 24, 1936, default.pretrain.crop)
    pre, sim = bench.build_params(args(pool_videos=128), default)  # the profile's rate: the profile's stride
    assert sim.fps == 20.0 and pre == default.pretrain
    pre, sim = bench.build_params(args(clips_per_epoch=100), default)  # no pool: the training clips
    assert sim is None and pre.clips_per_epoch == 100 and pre.stride == 12
    pre, sim = bench.build_params(args(pretrain_lr=2e-3), default)  # only the rate: the pipeline's epochs and clips
    assert sim is None and pre == dataclasses.replace(default.pretrain, lr=2e-3)
    pre, sim = bench.build_params(args(pretrain_seed=1), default)
    assert sim is None and pre == dataclasses.replace(default.pretrain, seed=1) and bench.builds(args(pretrain_seed=1))
    pre, sim = bench.build_params(args(pretrain_stride=24, pretrain_crop=48, pretrain_max_shift=0.0), default)
    assert sim is None and pre == dataclasses.replace(default.pretrain, stride=24, crop=48, max_shift=0.0)
    pre, sim = bench.build_params(args(pretrain_stride=24, pool_videos=128, pool_fps=5.0), default)
    assert pre.stride == 6  # the given stride, scaled to the pool's frame rate like the profile's
    tiny = load_params(REPO / "params.yaml", "tiny")
    assert tiny.preprocess.fps == 5.0
    pre, sim = bench.build_params(args(pool_videos=4, pool_fps=20.0), tiny)
    assert sim.fps == 20.0 and pre.stride == tiny.pretrain.stride


@pytest.mark.parametrize("given, message", [
    (["--pool-fps", "5"], "--pool-fps: the frame rate of the unlabelled pool, so only with --pool-videos"),
    (["--pool-videos", "4", "--pool-fps", "0"], "--pool-fps: must be positive, got 0.0"),
    (["--clips-per-epoch", "0"], "--clips-per-epoch: must be at least 1, got 0"),
    (["--pretrain-lr", "0"], "--pretrain-lr: must be positive, got 0.0"),
    (["--pretrain-stride", "0"], "--pretrain-stride: must be at least 1, got 0"),
    (["--pretrain-max-shift", "-1"], "--pretrain-max-shift: must be at least 0, got -1.0"),
    (["--pretrain-warmup", "-1"], "--pretrain-warmup: must be at least 0, got -1.0"),
    (["--pretrain-crop", "4"], "--pretrain-crop: must be at least 8, got 4"),
    (["--pretrain-crop", "40"], "--pretrain-crop: pretrain.crop=40 is too large for 32px frames"),
    (["--pretrain-epochs", "1", "--seeds", "0"], "--seeds: must be at least 1, got 0"),  # draw_params: every script
])
def test_label_seeds_refuses_bad_pretraining_options(tmp_path, given, message):
    proc = subprocess.run([sys.executable, str(LABEL_SEEDS), "--profile", "tiny", *given,
                           "--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_selection_oracle_reproduces_the_pipeline_s_choices(tiny_clips, tiny_test_clips, tiny_export, tmp_path):
    """What validation selects in the diagnosis is what the pipeline (label_seeds, same draw) scored; the oracle is
    the best test score over the candidates, so never below it."""
    encoder = tiny_export.parent / "pretrain"
    common = ["--profile", "tiny", "--clips", str(tiny_clips), "--test-clips", str(tiny_test_clips), "--encoder",
              str(encoder), "--seeds", "1", "--encoder-lr-decay", "0.25"]  # both apply the lever (tiny's: 0.5)
    subprocess.run([sys.executable, str(LABEL_SEEDS), *common, "--out", str(tmp_path / "seeds.json")],
                   check=True, capture_output=True, text=True, timeout=600)
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "selection_oracle.py"), *common,
                    "--out", str(tmp_path / "oracle.json")], check=True, capture_output=True, text=True, timeout=600)
    seeds = json.loads((tmp_path / "seeds.json").read_text())["per_seed"][0]
    oracle = json.loads((tmp_path / "oracle.json").read_text())
    row = oracle["per_seed"][0]
    for key in ("ssl_probe", "scratch_probe", "ssl_finetune", "scratch_finetune"):
        assert row[key]["selected"] == seeds[key], key
        assert row[key]["oracle"] == max(c["test"] for c in row[key]["candidates"]) >= row[key]["selected"]
    assert [c["epoch"] for c in row["ssl_finetune"]["candidates"]] == [1, 2]  # tiny: 2 fine-tune epochs
    assert len(row["ssl_probe"]["candidates"]) == 1  # tiny: probe_c [1.0]
    assert oracle["medians"]["finetune_gain_oracle"] == row["finetune_gain_oracle"]
    assert oracle["test_set"] == json.loads((tmp_path / "seeds.json").read_text())["test_set"]
    assert oracle["encoder_lr_decay"] == json.loads((tmp_path / "seeds.json").read_text())["encoder_lr_decay"] == 0.25
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "selection_oracle.py"), *common[:-2],
                           "--encoder-lr-decay", "2", "--out", str(tmp_path / "bad.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "finetune.encoder_lr_decay: must be in (0, 1]" in proc.stderr
    assert not (tmp_path / "bad.json").exists()


def test_encoder_pairs_fine_tunes_both_encoders_on_the_same_draws(tiny_clips, tiny_test_clips, tiny_export,
                                                                  tiny_params, tmp_path):
    """Each draw is the pipeline's fine-tune with that seed; an encoder paired with itself differs by exactly 0."""
    from sonossl.train.finetune import finetune

    encoder, out = tiny_export.parent / "pretrain", tmp_path / "pairs.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "encoder_pairs.py"), "--profile", "tiny", "--clips",
                    str(tiny_clips), "--test-clips", str(tiny_test_clips), "--encoder", str(encoder), "--against",
                    str(encoder), "--fractions", "0.5", "--seeds", "2", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    assert [(r["fraction"], r["seed"]) for r in result["per_seed"]] == [(0.5, 0), (0.5, 1)]
    assert all(r["encoder"] == r["against"] and r["difference"] == 0 for r in result["per_seed"])
    summary, = result["by_fraction"]
    assert summary["difference_positive_in"] == "0/2 seeds" and result["machine"]
    ft = dataclasses.replace(tiny_params.finetune, seed=1)
    m = finetune(tiny_clips, tmp_path / "stage", ft, encoder=encoder, fractions=[0.5], methods=("finetune",),
                 test_clips=tiny_test_clips, progress=False)
    assert result["per_seed"][1]["encoder"] == m["runs"][0]["test"]["macro_f1"]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "encoder_pairs.py"), "--profile", "tiny",
                           "--encoder", str(encoder), "--against", str(tmp_path / "nothing"),
                           "--out", str(tmp_path / "bad.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--against" in proc.stderr and "no encoder.pt" in proc.stderr
    assert not (tmp_path / "bad.json").exists()


def test_serve_example_sends_a_sweep_through_the_real_server_and_compares_labels(tiny_clips, tiny_export, tmp_path):
    import pandas as pd
    from conftest import free_port

    raw = tiny_clips.parent / "raw"
    video = pd.read_csv(raw / "labels.csv")["path"].iloc[0]
    out = tmp_path / "example.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve_example.py"), "--model-dir", str(tiny_export),
                    "--finetune", str(tiny_export.parent / "finetune"), "--raw", str(raw), "--video", video,
                    "--requests", "2", "--port", str(free_port()), "--out", str(out)], check=True, timeout=300)
    r = json.loads(out.read_text())
    card = json.loads((tiny_export / "model_card.json").read_text())
    assert r["model_version"] == r["response_abridged"]["model_version"] == card["model_version"]
    assert len(r["seconds"]) == 2 and r["frames"] > 0
    assert sum(r["true_to_predicted"].values()) == r["frames"] - r["blank_frames"] >= r["agree"]
    assert r["test_macro_f1"] == card["metrics"]["planes"]["test"]["macro_f1"]


def test_benchmark_records_name_the_cpu_model(tmp_path):
    import os
    import platform

    from sonossl.machine import cpu_details, cpu_model, describe

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\n")
    assert cpu_model(info) == "AMD EPYC 9654 96-Core Processor"
    missing = tmp_path / "missing"
    assert cpu_model(missing)  # falls back to what platform knows
    assert describe(missing) == f"{cpu_model(missing)}, {os.cpu_count()} cores, {platform.machine()}"
    # Two virtual machines that both call themselves "AMD EPYC" (a Zen 2 and a Zen 4): the records must differ.
    zen = "processor\t: {p}\ncpu family\t: {f}\nmodel\t\t: {m}\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 {isa}\n"
    old, new = tmp_path / "zen2", tmp_path / "zen4"
    old.write_text(zen.format(p=0, f=23, m=49, isa="avx avx2") + "\n" + zen.format(p=1, f=23, m=49, isa="avx avx2"))
    new.write_text(zen.format(p=0, f=25, m=17, isa="avx avx2 avx512f avx512_bf16"))
    assert cpu_details(old) == "family 23 model 49, AVX2"
    assert describe(new) == f"AMD EPYC (family 25 model 17, AVX-512), {os.cpu_count()} cores, {platform.machine()}"


def test_the_cpu_limit_is_read_from_the_cgroup(tmp_path):
    """cgroup v2's cpu.max and v1's cfs quota give the CPUs of a container's limit, rounded up; none without one."""
    from sonossl.machine import cpu_quota

    (tmp_path / "v2").mkdir()
    for text, cpus in [("200000 100000\n", 2), ("150000 100000", 2), ("50000 100000", 1), ("max 100000", None)]:
        (tmp_path / "v2" / "cpu.max").write_text(text)
        assert cpu_quota(tmp_path / "v2") == cpus, text
    (tmp_path / "v1" / "cpu").mkdir(parents=True)
    (tmp_path / "v1" / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    for quota, cpus in [("400000", 4), ("-1", None)]:
        (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
        assert cpu_quota(tmp_path / "v1") == cpus, quota
    assert cpu_quota(tmp_path / "none") is None


def test_pretext_rates_reproduces_the_pretrain_stage_at_the_profile_s_settings(tiny_clips, tiny_export, tiny_params,
                                                                               tmp_path):
    """One encoder per rate, batch size, order weight and seed; at the profile's own settings the held-out accuracies
    are the pretrain stage's."""
    out, lr, batch = tmp_path / "rates.json", tiny_params.pretrain.lr, tiny_params.pretrain.batch_size
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "pretext_rates.py"), "--profile", "tiny", "--clips",
                    str(tiny_clips), "--lr", str(lr), "0.004", "--batch-size", str(batch), "8", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    stage = json.loads((tiny_export.parent / "pretrain" / "metrics.json").read_text())
    assert result["finished"] == "4/4 runs"
    assert [(r["lr"], r["batch_size"]) for r in result["rates"]] == [(lr, batch), (lr, 8), (0.004, batch), (0.004, 8)]
    at_profile, *others = result["rates"]
    assert at_profile["val"] == {k: v for k, v in stage["val"].items() if k.endswith("_acc")}
    for other in others:
        assert set(other["val"]) == {"order_acc", "rotation_acc", "scale_acc", "shear_acc"} and other["seconds"] > 0
    # a smaller batch is another run (more, smaller steps over the same clips), not a copy of the profile's
    assert others[0]["train"] != at_profile["train"]
    assert result["chance"] == stage["chance"] and result["pretrain"]["batch_size"] == "per row"
    assert result["pretrain"]["epochs"] == "per row" and result["machine"]  # --epochs is an axis too
    assert {r["epochs"] for r in result["rates"]} == {tiny_params.pretrain.epochs}  # not given: the profile's
    assert {r["warmup_epochs"] for r in result["rates"]} == {tiny_params.pretrain.warmup_epochs}  # the same
    # --seeds: the profile's seed first (the same run again), then the next, which is another run; --order-weight
    # the same way, the profile's weight first
    weight = tiny_params.pretrain.loss_weights.order
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "pretext_rates.py"), "--profile", "tiny", "--clips",
                    str(tiny_clips), "--lr", str(lr), "--order-weight", str(weight), "3", "--seeds", "2", "--out",
                    str(out)], check=True, capture_output=True, text=True, timeout=600)
    seeded = json.loads(out.read_text())
    assert seeded["finished"] == "4/4 runs"
    assert [(r["order_weight"], r["seed"]) for r in seeded["rates"]] == [(weight, 0), (weight, 1), (3, 0), (3, 1)]
    same, next_seed, heavier, _ = seeded["rates"]
    assert same["val"] == at_profile["val"] and next_seed["train"] != at_profile["train"]
    assert heavier["train"] != at_profile["train"] and seeded["pretrain"]["loss_weights"]["order"] == "per row"
    # --first-seed adds seeds to an earlier screen: seed 1 alone is the run above, to the last digit
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "pretext_rates.py"), "--profile", "tiny", "--clips",
                    str(tiny_clips), "--lr", str(lr), "--first-seed", "1", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    added = json.loads(out.read_text())["rates"]
    assert [r["seed"] for r in added] == [1] and added[0]["val"] == next_seed["val"]


def test_pretext_rates_varies_stride_crop_and_shift(tiny_clips, tiny_params, tmp_path):
    """Every combination of --stride, --crop and --max-shift, each row naming its settings and the jitter it got
    (capped where the transformed crop would leave the frame); --clips-per-epoch holds the clips per epoch."""
    pre, out = tiny_params.pretrain, tmp_path / "axes.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "pretext_rates.py"), "--profile", "tiny", "--clips",
                    str(tiny_clips), "--lr", str(pre.lr), "--stride", "2", "3", "--clips-per-epoch", "48", "--crop",
                    "16", "--max-shift", "0", "100", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    room = transform_set(pre).max_shift(tiny_params.preprocess.frame_size, 16)
    assert result["finished"] == "4/4 runs"
    rows = result["rates"]
    assert [(r["stride"], r["crop"], r["max_shift"], r["shift_used"]) for r in rows] == [
        (2, 16, 0, 0), (2, 16, 100, round(room, 2)), (3, 16, 0, 0), (3, 16, 100, round(room, 2))]
    assert all(r["clips_per_epoch"] == 48 for r in rows)
    # a longer stride leaves fewer valid starts (train_clips, val_clips: distinct clips), and trains on other clips
    assert rows[2]["train_clips"] < rows[0]["train_clips"] and rows[2]["val_clips"] < rows[0]["val_clips"]
    assert rows[2]["train"] != rows[0]["train"]
    assert rows[1]["train"] != rows[0]["train"]  # the jitter is drawn
    assert all(result["pretrain"][key] == "per row" for key in ("stride", "crop", "max_shift", "clips_per_epoch"))


@pytest.mark.parametrize("given, message", [
    (["--lr", "1e-3", "0"], "--lr: every rate must be positive, got [0.0]"),
    (["--batch-size", "16", "0"], "--batch-size: every batch size must be at least 1, got [0]"),
    (["--seeds", "0"], "--seeds: must be at least 1, got 0"),
    (["--first-seed", "-1"], "--first-seed: must be at least 0, got -1"),
    (["--order-weight", "2", "0"], "--order-weight: every weight must be positive, got [0.0]"),
    (["--stride", "2", "0"], "--stride: every stride must be at least 1, got [0]"),
    (["--clips-per-epoch", "0"], "--clips-per-epoch: every number of clips must be at least 1, got [0]"),
    (["--max-shift", "-1"], "--max-shift: every shift must be at least 0, got [-1.0]"),
    (["--warmup-epochs", "1", "-1"], "--warmup-epochs: every warm-up must be at least 0, got [-1.0]"),
    (["--crop", "4"], "--crop: every crop must be at least 8, got [4]"),
    (["--crop", "16", "40"], "--crop: pretrain.crop=40 is too large for 32px frames"),
    (["--stride", "2", "9"], "--stride: every stride must fit a clip of k=4 frames into the longest training video"),
])
def test_pretext_rates_refuses_bad_settings(tiny_clips, tmp_path, given, message):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pretext_rates.py"), "--profile", "tiny",
                           "--clips", str(tiny_clips), *given, "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_simulator_speed_compares_two_revisions_and_their_renders(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "simulator_speed.py"), "--base", "HEAD",
                           "--this", "HEAD", "--profile", "tiny", "--indices", "0", "2", "--repeats", "1",
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(out.read_text())
    assert rec["identical"] and rec["differing_sweeps"] == []
    assert set(rec["seconds_per_sweep"]["base"]) == set(rec["seconds_per_sweep"]["this"]) == {"0", "2"}
    assert rec["median_speedup"] > 0 and rec["this"] == rec["base"]
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "simulator_speed.py"), "--base", "no-such-rev",
                          "--profile", "tiny", "--out", str(tmp_path / "bad.json")], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "revision 'no-such-rev'" in bad.stderr and not (tmp_path / "bad.json").exists()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    del params["tiny"]["simulate_test"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    no_test = subprocess.run([sys.executable, str(REPO / "benchmarks" / "simulator_speed.py"), "--base", "HEAD",
                              "--params", str(tmp_path / "params.yaml"), "--profile", "tiny", "--which", "sim_test",
                              "--out", str(tmp_path / "bad.json")], capture_output=True, text=True, timeout=120)
    assert no_test.returncode != 0 and "has no tiny.simulate_test block" in no_test.stderr
    no_profile = subprocess.run([sys.executable, str(REPO / "benchmarks" / "simulator_speed.py"), "--base", "HEAD",
                                 "--profile", "nosuch", "--out", str(tmp_path / "bad.json")], capture_output=True,
                                text=True, timeout=120)
    assert no_profile.returncode == 2 and "profile 'nosuch' is not one of" in no_profile.stderr
    assert not (tmp_path / "bad.json").exists()


def test_simulator_speed_workers_read_only_the_simulate_blocks(monkeypatch, tmp_path):
    """The workers of both revisions get the profile's simulate and simulate_test blocks and nothing else, so a key
    that only this checkout's code knows (in any other section) cannot break the other revision's run."""
    import yaml

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    simulate_only = importlib.import_module("simulator_speed").simulate_only
    path = simulate_only(str(REPO / "params.yaml"), "tiny", tmp_path)
    doc = yaml.safe_load(Path(path).read_text())
    assert doc.keys() == {"profile", "tiny"} and doc["tiny"].keys() == {"simulate", "simulate_test"}
    full, kept = load_params(REPO / "params.yaml", "tiny"), load_params(path)
    assert (kept.simulate, kept.simulate_test) == (full.simulate, full.simulate_test)


def test_simulator_speed_digest_sees_every_part_of_a_sweep(monkeypatch):
    from sonossl.data.simulate import render_sweep

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    digest = importlib.import_module("simulator_speed").digest
    sweep = render_sweep(0, load_params(REPO / "params.yaml", "tiny").simulate)
    ref = digest(sweep)
    assert digest(dataclasses.replace(sweep)) == ref
    frames = sweep.frames.copy()
    frames.flat[123] ^= 1
    saliency = sweep.saliency.copy()
    saliency.flat[7] = np.nextafter(saliency.flat[7], np.float32(1))
    extra = {**sweep.extra, "pose": sweep.extra["pose"] + np.float32(1)}
    for changed in (dataclasses.replace(sweep, frames=frames), dataclasses.replace(sweep, saliency=saliency),
                    dataclasses.replace(sweep, extra=extra), dataclasses.replace(sweep, row={**sweep.row, "frames": 0})):
        assert digest(changed) != ref


def test_gpu_check_runs_the_profile_s_pretraining_without_pyav_or_dvclive(tmp_path):
    """The script a session lent a GPU runs in one call: here on the CPU, tiny profile, with the packages the device
    image lacks (PyAV, dvclive, and the serving and pipeline stack) made unimportable."""
    out = tmp_path / "gpu_check.json"
    script = REPO / "benchmarks" / "gpu_check.py"
    args = ["--profile", "tiny", "--videos", "3", "--val-videos", "1", "--epochs", "2", "--steps", "2",
            "--timing-steps", "2", "--repeats", "2", "--workers", "2", "--out", str(out)]
    run = ("import runpy, sys\n"
           "for name in ('av', 'dvclive', 'kfp', 'kserve', 'boto3', 'evidently', 'dvc'):\n"
           "    sys.modules[name] = None\n"
           f"sys.argv = [{str(script)!r}, *{args!r}]\n"
           f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    # CUDA hidden: on a machine with a GPU the run would take it, and this test is about the CPU path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "benchmarks")]),
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["finished"] == ["data", "training", "throughput"] and rec["device"].startswith("cpu")
    assert rec["errors"] == {} and rec["training"]["loss_fell"] in (True, False)
    assert rec["profile"] == "tiny" and rec["amp"] is None and rec["batch_size"] == 16
    assert rec["data"]["frames"] == 3 * 30  # three sweeps of 3 s at 10 frames/s, every frame kept
    hist = rec["training"]["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    heads = ("order", "rotation", "scale", "shear")
    assert set(rec["training"]["chance"]) == {f"{h}_acc" for h in heads}
    assert all(f"val_{h}_acc" in hist[-1] for h in heads)  # held-out accuracy per head, beside chance
    t = rec["throughput"]
    assert len(t["loop_clips_per_s"]) == len(t["model_only_clips_per_s"]) == 2
    assert t["ratio"] == pytest.approx(t["median_loop_clips_per_s"] / t["median_model_only_clips_per_s"], abs=2e-3)
    bad = subprocess.run([sys.executable, str(script), "--videos", "2", "--val-videos", "2"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert bad.returncode != 0 and "--val-videos: must be at least 1 and fewer than --videos (2)" in bad.stderr
    # a training part that fails (here: out of memory, made up) is recorded with its message; the throughput part
    # still runs and the exit code says a part failed, so the one short GPU run is not lost to one error
    failing = ("import sonossl.train.loop as loop\n"
               "fit = loop.fit\n"
               "def oom(task, out, params, **kw):\n"
               "    if params.epochs > 1:\n"
               "        raise RuntimeError('CUDA out of memory (made up by the test)')\n"
               "    return fit(task, out, params, **kw)\n"
               "loop.fit = oom\n")
    proc = subprocess.run([sys.executable, "-c", failing + run], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["finished"] == ["data", "throughput"] and "training" not in rec
    assert rec["errors"] == {"training": "RuntimeError: CUDA out of memory (made up by the test)"}
    assert "in oom" in rec["tracebacks"]["training"] and rec["throughput"]["ratio"] > 0


def test_pretext_texture_probe_names_what_white_noise_gives_away(tmp_path, monkeypatch, tiny_clips):
    """The texture statistics are what they say (white noise: variance 1/12 of the grey range, no correlation
    between neighbours on an unwarped crop), and the probe writes one accuracy per factor beside its chance, on noise
    or on a clip dataset's training clips (``--frames-from``)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import pretext_texture_probe as probe

    noise = torch.rand(64, 4, 48, 48, generator=torch.Generator().manual_seed(0))
    stats = probe.texture_statistics(noise)
    assert stats[:, 0].mean().item() == pytest.approx(1 / 12, rel=0.02)
    assert stats[:, 1:].abs().max().item() < 0.05
    smooth = noise + noise.roll(1, -1)  # each pixel shares one value with its right neighbour: lag (0, 1) = 0.5
    assert probe.texture_statistics(smooth)[:, 1].mean().item() == pytest.approx(0.5, abs=0.03)

    out = tmp_path / "probe.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks/pretext_texture_probe.py"), "--profile", "tiny",
                    "--clips", "300", "--out", str(out)], check=True, capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    assert set(result["accuracy"]) == {"rotation", "scale", "shear"} and result["clips"] == 300
    assert result["accuracy"]["rotation"]["chance"] == 0.333 and "at_shear_0" in result["accuracy"]["rotation"]
    assert result["frames"] == "white noise"
    subprocess.run([sys.executable, str(REPO / "benchmarks/pretext_texture_probe.py"), "--profile", "tiny",
                    "--clips", "300", "--frames-from", str(tiny_clips), "--out", str(out)], check=True,
                   capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["frames"] == str(tiny_clips) and result["clips"] == 300 and set(result["accuracy"]) == {
        "rotation", "scale", "shear"}
    # the clips are pretraining's: every valid start of a training video (none of validation or test), each video
    # drawn from
    from sonossl.data.clips import load_clip_dataset
    from sonossl.pretext.batch import clip_starts

    index, pre = load_clip_dataset(tiny_clips).index, load_params(REPO / "params.yaml", "tiny").pretrain
    train = index["split"].to_numpy() == "train"
    valid = clip_starts(index["video_idx"].to_numpy(), pre.k, pre.stride)
    assert result["clip_starts"] == int(train[valid].sum()) > 0
    assert result["videos"] == sorted(set(index["video_idx"][train].tolist()))


def test_scratch_init_of_the_draw_benchmarks(monkeypatch):
    """--scratch-init sets finetune.scratch_init; "encoder" makes it null (scratch starts as the compared encoder);
    absent, the profile's stays (the default profile's: torchvision, beside a pytorch SSL encoder)."""
    monkeypatch.syspath_prepend(str(LABEL_SEEDS.parent))
    from label_seeds import draw_args, draw_params, scratch_twin

    from sonossl.config import scratch_spec

    def scratch_of(*argv: str) -> dict:
        args = draw_args("")
        params = scratch_twin(draw_params(args.parse_args(["--profile", "default", *argv])), None, "pytorch")
        return scratch_spec(params)

    assert scratch_of()["init"] == "torchvision" and scratch_of("--scratch-init", "pytorch")["init"] == "pytorch"
    assert scratch_of("--scratch-init", "encoder")["init"] == "pytorch"  # as the compared (pytorch) encoder
    with pytest.raises(SystemExit):
        draw_args("").parse_args(["--scratch-init", "kaiming"])
    assert "--scratch-init" not in draw_args("", scratch=False).format_help()  # encoder_pairs trains no scratch


def test_train_throughput_records_the_ratio_of_the_medians_of_alternating_runs(tiny_clips, tmp_path):
    """The loop and the model alone, in turn, in one run: the record's ratio is the ratio of the two medians, each
    median over the listed repeats, and it names the machine."""
    import statistics

    out = tmp_path / "tt.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--profile", "tiny",
                           "--clips", str(tiny_clips), "--steps", "2", "--repeats", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src"), "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["repeats"] == 3 and len(rec["loop_clips_per_s"]) == len(rec["model_only_clips_per_s"]) == 3
    loop, model = statistics.median(rec["loop_clips_per_s"]), statistics.median(rec["model_only_clips_per_s"])
    assert (rec["median_loop_clips_per_s"], rec["median_model_only_clips_per_s"]) == (loop, model)
    assert rec["ratio"] == pytest.approx(loop / model, abs=2e-3) and rec["batch_size"] == 16
    assert rec["machine"] and rec["device"].startswith("cpu")
    assert proc.stdout.count("repeat ") == 3  # progress, one line per repeat


def test_preprocess_benchmark_records_the_ratio_of_medians_against_decode_only(pocus_subset, tmp_path, monkeypatch,
                                                                              capsys):
    """benchmarks/preprocess.py on 12 real videos: decode-only and the whole preprocess alternate, the record's
    ratio is the ratio of their medians over the listed runs, and it names the machine; a folder without
    labels.csv is refused by name."""
    import statistics

    monkeypatch.syspath_prepend(str(LABEL_SEEDS.parent))
    bench = importlib.import_module("preprocess")
    out = tmp_path / "pre.json"
    assert bench.main(["--data", str(pocus_subset), "--size", "32", "--repeats", "3", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["videos"] == 12 and rec["repeats"] == 3 and rec["params"]["frame_size"] == 32
    dec = statistics.median(r["fps"] for r in rec["runs"]["decode_only"])
    pre = statistics.median(r["fps"] for r in rec["runs"]["preprocess"])
    assert rec["ratio"] == pytest.approx(pre / dec, abs=1e-3) and rec["machine"]["processor"]
    assert all(r["frames"] == rec["runs"]["decode_only"][0]["frames"] for r in rec["runs"]["decode_only"])
    assert capsys.readouterr().err.count("repeat ") == 3  # progress, one line per repeat
    assert bench.main(["--data", str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2
    assert f"{tmp_path}: no labels.csv" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_serve_benchmark_times_the_real_server_against_the_same_work_in_process(tiny_clips, tiny_export, tmp_path):
    """benchmarks/serve.py on the tiny model: its ratios are of the numbers it records beside them (each server run
    against the in-process calls interleaved with it), and too few requests are refused before a server starts."""
    from conftest import free_port

    out = tmp_path / "serve.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "serve.py"), "--model-dir", str(tiny_export), "--raw",
           str(tiny_clips.parent / "raw"), "--port", str(free_port()), "--out", str(out)]
    proc = subprocess.run([*cmd, "--requests", "20"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    logged, unlogged = r["server_with_request_log"]["concurrency_1"], r["server_without_request_log"]["concurrency_1"]
    assert logged["requests"] == unlogged["requests"] == 20 and r["server_frames_as_json_numbers"][
        "concurrency_1"]["requests"] == 10
    assert r["ratio_p50_c1_vs_in_process"] == pytest.approx(
        logged["p50_ms"] / r["in_process"]["preprocess_and_forward"]["p50_ms"], abs=2e-3)
    assert r["ratio_p50_c1_log_on_vs_off"] == pytest.approx(
        (logged["p50_ms"] / r["in_process"]["preprocess_and_forward"]["p50_ms"])
        / (unlogged["p50_ms"] / r["in_process_p50_ms_beside_the_unlogged_server"]), abs=2e-3)
    assert r["machine"] and r["clip"] == [4, *r["clip"][1:]]
    out.unlink()
    proc = subprocess.run([*cmd, "--requests", "5"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--requests: at least 20" in proc.stderr and not out.exists()


def test_machine_speed_records_the_reference_speed_over_the_measured_one(tmp_path, monkeypatch, capsys):
    """benchmarks/machine_speed.py: each size's slowdown is the issue's reference frames/s over the median of the
    listed runs, the record's slowdown the median of the sizes', and it names the machine; bad counts are refused."""
    import statistics

    monkeypatch.syspath_prepend(str(LABEL_SEEDS.parent))
    bench = importlib.import_module("machine_speed")
    out = tmp_path / "speed.json"
    assert bench.main(["--batch", "2", "--steps", "1", "--repeats", "3", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert (rec["batch"], rec["steps"], rec["repeats"]) == (2, 1, 3) and rec["machine"] and rec["torch"]
    slowdowns = []
    for size, reference in ((64, 55.0), (112, 26.0)):
        runs = rec[f"{size}px"]
        assert len(runs["frames_per_s"]) == 3 and runs["reference"] == reference
        assert runs["median"] == pytest.approx(statistics.median(runs["frames_per_s"]), abs=0.051)
        # from the unrounded median: within what rounding the median to 0.1 frames/s and the ratio to 0.01 allows
        m = runs["median"]
        assert reference / (m + 0.05) - 0.006 <= runs["slowdown"] <= reference / max(m - 0.05, 1e-9) + 0.006
        slowdowns.append(runs["slowdown"])
    assert rec["slowdown"] == pytest.approx(statistics.median(slowdowns), abs=0.011)
    assert json.loads(capsys.readouterr().out) == rec
    with pytest.raises(SystemExit) as refused:
        bench.main(["--repeats", "0", "--out", str(tmp_path / "x.json")])
    assert refused.value.code == 2 and "at least 1" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_drift_cases_serves_four_windows_and_reports_each(drift_export, pocus_subset, tmp_path):
    """benchmarks/drift_cases.py (`make drift-demo`) on a tiny model: four windows sent through the real server, a
    report and a record row for each; the real POCUS videos, of sizes the model never saw, drift. The other verdicts
    are not checked: two tiny sweeps a window are too few to hold them (tests/test_drift.py checks verdicts)."""
    from conftest import free_port

    record, reports = tmp_path / "drift_cases.json", tmp_path / "reports"
    cmd = [sys.executable, str(REPO / "benchmarks" / "drift_cases.py"), "--model-dir", str(drift_export),
           "--test-raw", str(drift_export.parent / "raw"), "--videos", "2", "--profile", "tiny", "--pocus",
           str(pocus_subset), "--out", str(reports), "--record", str(record), "--port", str(free_port())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(record.read_text())
    windows = rec["windows"]
    assert list(windows) == ["heldout", "fresh", "bright", "pocus"] and rec["machine"]
    assert [w["videos"] for w in windows.values()] == [2, 2, 2, 3]  # pocus: one video of each class
    assert all(w["frames"] == w["frames_served"] > 0 for w in windows.values())  # every served frame logged
    assert windows["pocus"]["drift_detected"] and rec["model_version"] == json.loads(
        (drift_export / "model_card.json").read_text())["model_version"]
    html = (reports / "index.html").read_text()
    assert all(f'href="{w}/drift.html"' in html for w in windows)
    assert f"wrote {record}; reports: {reports}/index.html" in proc.stdout
    bad = subprocess.run([*cmd[:6], "--pocus", str(tmp_path), "--record", str(tmp_path / "x.json")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and f"{tmp_path}: no labels.csv" in bad.stderr and not (tmp_path / "x.json").exists()
