"""DVC with an S3 remote (a real local S3 server) and DVC after ``kill -9``, in a temporary copy of the repository on
the tiny profile: ``dvc push`` / ``dvc pull`` of the raw and clip datasets and a model give back the same bytes, and
a ``dvc repro`` killed in the middle of preprocess or training caches nothing partial and reruns to the same result
(training resumes from its last checkpoint)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_dvc_pipeline import _copy_repo, _dvc, _edit_params, _tiny_sim_repo

OUTS = ["data/raw/sim", "data/clips/sim", "models/pretrain/order/encoder.pt"]  # raw data, features, a model


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    """The repository on the tiny profile after `dvc repro pretrain@order` (simulate, preprocess, one encoder).
    Read-only: each test works on its own copy."""
    root = _tiny_sim_repo(tmp_path_factory.mktemp("dvc"))
    _dvc(root, "repro", "pretrain@order")
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _files(root: Path, rels: list[str]) -> dict[str, bytes]:
    out = {}
    for rel in rels:
        p = root / rel
        for f in sorted([p] if p.is_file() else p.rglob("*")):
            if f.is_file():
                out[f.relative_to(root).as_posix()] = f.read_bytes()
    return out


def _cache_entries(root: Path) -> dict[str, str]:
    """Every file in the DVC cache -> its md5 name; asserts each one's content hashes to its name (a .dir entry
    is the md5 of its JSON listing), so no entry is partial or damaged."""
    entries = {}
    for f in sorted((root / ".dvc/cache/files/md5").rglob("*")):
        if f.is_file():
            name = f.parent.name + f.name.removesuffix(".dir")
            assert hashlib.md5(f.read_bytes()).hexdigest() == name, f"damaged cache entry {f}"
            entries[f.relative_to(root).as_posix()] = name
    return entries


def _lock_outs(root: Path, stage: str) -> dict[str, str]:
    import yaml

    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for o in lock.get(stage, {}).get("outs", [])}


def _env() -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.slow
def test_dvc_push_delete_everything_then_pull_is_byte_identical(tiny_repo, tmp_path, s3_server):
    root = _copy(tiny_repo, tmp_path / "repo")
    before = _files(root, OUTS)
    assert any(k.startswith("data/raw/sim/") for k in before) and "data/clips/sim/frames.npy" in before
    # The documented remote set-up (README, "Storage and versioning"); credentials stay in the environment.
    _dvc(root, "remote", "add", "-d", "storage", f"s3://{s3_server.bucket}/dvc")
    _dvc(root, "remote", "modify", "storage", "endpointurl", s3_server.endpoint_url)
    _dvc(root, "remote", "modify", "storage", "region", "us-east-1")
    _dvc(root, "remote", "modify", "storage", "verify", "true")  # rehash what `dvc pull` downloads
    assert "testing" not in (root / ".dvc/config").read_text()

    out = _dvc(root, "push", "pretrain@order", "preprocess@sim", "simulate")
    pushed = int(re.search(r"(\d+) files? pushed", out).group(1))
    cached = _cache_entries(root)
    assert pushed == len(cached), out  # every cache entry went up (the .dir listings included)
    remote = s3_server.objects()
    assert {k.rsplit("/", 2)[-2] + k.rsplit("/", 1)[-1].removesuffix(".dir") for k in remote} == set(cached.values())

    shutil.rmtree(root / ".dvc/cache")
    for rel in OUTS:
        p = root / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out = _dvc(root, "pull", "pretrain@order", "preprocess@sim", "simulate")
    assert _files(root, OUTS) == before
    assert _cache_entries(root) == cached
    assert "up to date" in _dvc(root, "status", "pretrain@order")
    assert "Cache and remote 'storage' are in sync" in _dvc(root, "status", "--cloud", "pretrain@order")

    # A remote object damaged after the push: `dvc pull` (verify = true) refuses it and checks nothing out
    # (with verify = false, the default, DVC checks the damaged bytes out).
    encoder = root / "models/pretrain/order/encoder.pt"
    md5 = hashlib.md5(encoder.read_bytes()).hexdigest()
    key = next(k for k in remote if k.endswith(f"/{md5[:2]}/{md5[2:]}"))
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=key, Body=b"damaged" + encoder.read_bytes()[7:])
    shutil.rmtree(root / ".dvc/cache")
    encoder.unlink()
    proc = subprocess.run([sys.executable, "-m", "dvc", "pull", "pretrain@order"], cwd=root, env=_env(),
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Checkout failed" in proc.stderr and not encoder.exists(), proc.stderr
    assert md5 not in _cache_entries(root).values()  # the damaged download was not kept (and what is, verifies)


@pytest.mark.slow
def test_a_clone_pulls_every_output_and_has_nothing_to_rerun(tiny_repo, tmp_path, s3_server):
    """What git holds, then `dvc pull`: every output comes back (metrics and curves too: with `cache: false` they
    existed nowhere, so a clone saw each training stage as changed and `dvc repro` retrained it from scratch)."""
    root = _copy(tiny_repo, tmp_path / "repo")
    _dvc(root, "remote", "add", "-d", "storage", f"s3://{s3_server.bucket}/dvc")
    _dvc(root, "remote", "modify", "storage", "endpointurl", s3_server.endpoint_url)
    _dvc(root, "push", "--with-deps", "pretrain@order")
    clone = tmp_path / "clone"
    clone.mkdir()
    _copy_repo(clone, root)
    assert not (clone / "models").exists() and not (clone / "data/clips/sim").exists()  # only what git holds
    _dvc(clone, "pull", "--with-deps", "pretrain@order")
    assert "up to date" in _dvc(clone, "status", "pretrain@order")
    out = _dvc(clone, "repro", "pretrain@order")
    assert "Running stage" not in out, out
    assert "order_acc" in _dvc(clone, "metrics", "show")
    outs = ["models/pretrain/order/metrics.json", "models/pretrain/order/live/plots/metrics", *OUTS]
    assert _files(clone, outs) == _files(root, outs)
    assert not (clone / "models/pretrain/order/checkpoints").exists()  # resume state stays where it was made


def _start(root: Path, *args: str) -> subprocess.Popen:
    # A session of its own, so that kill -9 hits dvc and the stage's command together, as a dying machine would.
    return subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=root, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 120, poll: float = 0.005) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"dvc ended before {what}:\n{proc.stdout.read()}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_kill_9_during_dvc_repro_of_preprocess_then_rerun(tiny_repo, tmp_path):
    def smaller_frames(doc):
        doc["tiny"]["preprocess"]["frame_size"] = 24

    # The result of an uninterrupted run, for comparison.
    reference = _copy(tiny_repo, tmp_path / "reference")
    _edit_params(reference, smaller_frames)
    _dvc(reference, "repro", "preprocess@sim")

    root = _copy(tiny_repo, tmp_path / "repo")
    _edit_params(root, smaller_frames)
    cache, lock = _cache_entries(root), (root / "dvc.lock").read_text()
    proc = _start(root, "repro", "preprocess@sim")
    _kill_when(proc, lambda: any((root / "data/clips").glob(".sim.staging-*")), "preprocess started writing")

    assert not (root / "data/clips/sim").exists()  # dvc removed the old output; no partial one took its place
    assert _cache_entries(root) == cache  # nothing new (partial) in the cache, and every entry verifies
    assert (root / "dvc.lock").read_text() == lock  # the interrupted run is not recorded

    out = _dvc(root, "repro", "preprocess@sim")
    assert "Running stage 'preprocess@sim'" in out and "Running stage 'simulate'" not in out, out
    assert "had been killed. Auto removed it from the lock file" in out  # the killed run's stale lock
    # the killed run's staging is gone (beside the output: DVC's .gitignore listing it)
    assert sorted(p.name for p in (root / "data/clips").iterdir()) == [".gitignore", "sim"]
    assert _files(root, ["data/clips/sim"]) == _files(reference, ["data/clips/sim"])
    assert _lock_outs(root, "preprocess@sim") == _lock_outs(reference, "preprocess@sim")
    assert "up to date" in _dvc(root, "status", "preprocess@sim")
    entries = _cache_entries(root)
    assert _lock_outs(root, "preprocess@sim")["data/clips/sim"].removesuffix(".dir") in entries.values()


@pytest.mark.slow
def test_kill_9_during_dvc_repro_of_training_then_rerun_resumes(tiny_repo, tmp_path):
    root = _copy(tiny_repo, tmp_path / "repo")
    # pretrain@order is an ablation encoder: it trains pretrain.ablation_epochs (order mode: about 0.1 s an epoch)
    _edit_params(root, lambda doc: doc["tiny"]["pretrain"].update(ablation_epochs=16))
    cache, lock = _cache_entries(root), (root / "dvc.lock").read_text()
    out_dir = root / "models/pretrain/order"
    last = out_dir / "checkpoints/last.pt"

    def epochs_done() -> int:
        from sonossl.train.loop import load_checkpoint

        return load_checkpoint(last)["epoch"]  # always whole: written atomically

    # the fixture's run (tiny: ablation_epochs 1); another epoch count is another run, so the first repro below starts
    # over from epoch 0 rather than resuming it
    assert epochs_done() == 1
    proc = _start(root, "repro", "pretrain@order")
    _kill_when(proc, lambda: epochs_done() >= 4, "four epochs", poll=0.02)
    done = epochs_done()
    assert 4 <= done < 16
    assert not (out_dir / "encoder.pt").exists()  # dvc removed the old one; the killed run wrote none
    assert _cache_entries(root) == cache and (root / "dvc.lock").read_text() == lock

    out = _dvc(root, "repro", "pretrain@order")
    assert "Running stage 'pretrain@order'" in out and f"resuming after epoch {done} of 16" in out, out
    assert "Running stage 'preprocess@sim'" not in out
    assert "up to date" in _dvc(root, "status", "pretrain@order")
    from sonossl.train.loop import load_checkpoint

    assert [h["epoch"] for h in load_checkpoint(last)["history"]] == list(range(1, 17))
    encoder_md5 = _lock_outs(root, "pretrain@order")["models/pretrain/order/encoder.pt"]
    assert hashlib.md5((out_dir / "encoder.pt").read_bytes()).hexdigest() == encoder_md5
    assert encoder_md5 in _cache_entries(root).values()
