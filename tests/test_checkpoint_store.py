"""The pipelines' checkpoint store: a GPU step's output folder mirrored to S3 (a real local S3 server) while it
runs, so that a retried step, in a new pod with an empty folder, resumes from the last epoch an earlier attempt
reached instead of starting over."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _objects(s3_server, prefix: str) -> dict[str, bytes]:
    return {k.removeprefix(prefix): v for k, v in s3_server.objects().items() if k.startswith(prefix)}


def test_mirror_copies_the_folder_while_it_runs_and_a_new_attempt_restores_it(s3_server, tmp_path, caplog):
    from sonossl.pipeline.mirror import mirrored, store_uri

    store = f"s3://{s3_server.bucket}/checkpoints"
    first = tmp_path / "attempt1"
    caplog.set_level(logging.INFO)
    storage_log = logging.getLogger("sonossl.storage.s3")
    level = storage_log.level
    with mirrored(first, store_uri(store, "pretrain", "key-1"), interval=0.05) as uri:
        assert uri == f"{store}/pretrain/key-1"
        (first / "checkpoints").mkdir()
        (first / "checkpoints/last.pt").write_bytes(b"epoch 1")
        (first / "checkpoints/.last.pt.x1y2.tmp").write_bytes(b"half written")  # an atomic write's temporary
        deadline = time.time() + 30
        while "checkpoints/last.pt" not in _objects(s3_server, "checkpoints/pretrain/key-1/"):
            assert time.time() < deadline, "the folder was not copied while the step ran"
            time.sleep(0.02)
        (first / "checkpoints/last.pt").write_bytes(b"epoch 2")
        (first / "metrics.json").write_text("{}")
    assert _objects(s3_server, "checkpoints/pretrain/key-1/") == {  # the last state, copied as the block ended
        "checkpoints/last.pt": b"epoch 2", "metrics.json": b"{}"}
    # One line for the copy, none per file (those are at DEBUG), and the storage log's level left as it was.
    assert "folder copied" in caplog.text and "uploaded 1 of 1 file(s)" not in caplog.text
    assert storage_log.level == level

    second = tmp_path / "attempt2"  # a retry: a new pod, an empty output folder
    with mirrored(second, f"{store}/pretrain/key-1", interval=60):
        assert (second / "checkpoints/last.pt").read_bytes() == b"epoch 2"
        assert sorted(p.name for p in second.rglob("*")) == ["checkpoints", "last.pt", "metrics.json"]
    with mirrored(tmp_path / "other", f"{store}/pretrain/key-2"):  # other work starts fresh
        assert not any((tmp_path / "other").iterdir())
    # a damaged store (bytes that do not match their sha256 metadata) must not fail every retry: a warning, what it
    # held deleted (a fresh run writing the same bytes would otherwise leave the damaged object, its metadata
    # matching), a fresh start, and the copies fill it again
    s3 = s3_server.client()
    key = "checkpoints/pretrain/key-1/checkpoints/last.pt"
    meta = s3.head_object(Bucket=s3_server.bucket, Key=key)["Metadata"]
    s3.put_object(Bucket=s3_server.bucket, Key=key, Body=b"epoch 3", Metadata=meta)
    third = tmp_path / "attempt3"
    with mirrored(third, f"{store}/pretrain/key-1", interval=60):
        assert not any(third.iterdir()) and _objects(s3_server, "checkpoints/pretrain/key-1/") == {}
        (third / "checkpoints").mkdir()
        (third / "checkpoints/last.pt").write_bytes(b"epoch 2")  # the same bytes as the damaged object's metadata
    assert f"checkpoint store {store}/pretrain/key-1: cannot be restored" in caplog.text
    assert "checksum mismatch" in caplog.text and "deleting what it holds and starting fresh" in caplog.text
    assert _objects(s3_server, "checkpoints/pretrain/key-1/") == {"checkpoints/last.pt": b"epoch 2"}
    with mirrored(tmp_path / "attempt4", f"{store}/pretrain/key-1", interval=60):  # and it restores again
        assert (tmp_path / "attempt4/checkpoints/last.pt").read_bytes() == b"epoch 2"
    with mirrored(tmp_path / "none", None) as uri:  # no store: nothing mirrored
        assert uri is None
    for store, key, message in [("/data/checkpoints", "key-1", "give an s3:// prefix"),
                                (store, "", "the key '' must be a non-empty name")]:
        with pytest.raises(ValueError, match=message):
            store_uri(store, "pretrain", key)
    with pytest.raises(ValueError, match="give an s3:// prefix"), mirrored(tmp_path / "bad", "/data/checkpoints"):
        pass


def test_sigterm_copies_the_folder_before_the_step_exits(s3_server, tmp_path):
    """A preempted node's pod gets SIGTERM: the step stops (exit status 143) after one last copy."""
    from sonossl.pipeline.mirror import mirrored

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        with mirrored(tmp_path / "out", f"s3://{s3_server.bucket}/ck/crossval/key-1", interval=60):
            (tmp_path / "out/folds").mkdir(parents=True)
            (tmp_path / "out/folds/fold0.json").write_text("done")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert stopped.value.code == 128 + signal.SIGTERM
    assert _objects(s3_server, "ck/crossval/key-1/") == {"folds/fold0.json": b"done"}
    assert signal.getsignal(signal.SIGTERM) == before  # restored


@pytest.mark.slow
def test_a_pretrain_step_stopped_mid_run_resumes_in_a_fresh_folder_from_the_store(s3_server, tiny_clips, tmp_path,
                                                                                     caplog, monkeypatch):
    """pretrain_step with a checkpoint store, in its own process, is sent SIGTERM after a few epochs; the same step
    in a new, empty folder (a retry's pod) resumes after the last copied epoch and ends with the same encoder, byte
    for byte, as a run that was never stopped."""
    from sonossl.pipeline.steps import pretrain_step
    from sonossl.train.loop import load_checkpoint

    store = f"s3://{s3_server.bucket}/checkpoints"
    env = {**os.environ, "SONOSSL_PARAMS": str(REPO / "params.yaml"), "SONOSSL_CHECKPOINT_SYNC_SECONDS": "0.05"}
    first = tmp_path / "attempt1"
    code = ("import sys; from sonossl.pipeline.steps import pretrain_step; "
            "pretrain_step(sys.argv[1], sys.argv[2], 'tiny', mode='order', epochs=16, "
            f"checkpoint_store={store!r})")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tiny_clips), str(first)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = first / "checkpoints/last.pt"
    deadline = time.time() + 120
    while not (last.is_file() and load_checkpoint(last)["epoch"] >= 4):
        assert proc.poll() is None, f"the step ended before four epochs:\n{proc.stdout.read()}"
        assert time.time() < deadline, "timed out waiting for four epochs"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, log
    done = load_checkpoint(last)["epoch"]
    assert 4 <= done < 16 and not (first / "encoder.pt").exists(), log

    monkeypatch.setenv("SONOSSL_PARAMS", env["SONOSSL_PARAMS"])
    with caplog.at_level("INFO"):
        pretrain_step(tiny_clips, tmp_path / "attempt2", "tiny", mode="order", epochs=16, checkpoint_store=store)
        pretrain_step(tiny_clips, tmp_path / "never-stopped", "tiny", mode="order", epochs=16)
    assert f"resuming after epoch {done} of 16" in caplog.text
    assert [h["epoch"] for h in load_checkpoint(tmp_path / "attempt2/checkpoints/last.pt")["history"]] == \
        list(range(1, 17))
    digest = [hashlib.sha256((tmp_path / d / "encoder.pt").read_bytes()).hexdigest()
              for d in ("attempt2", "never-stopped")]
    assert digest[0] == digest[1]


def test_the_work_key_follows_the_data_the_parameters_and_the_step_s_arguments(tiny_clips, tiny_test_clips,
                                                                              monkeypatch):
    """The same work gets the same folder in the store (a retry, or a later run, resumes it); other work another."""
    from sonossl.pipeline.steps import load_profile, work_key

    monkeypatch.setenv("SONOSSL_PARAMS", str(REPO / "params.yaml"))
    base = work_key(tiny_clips, load_profile("tiny"), "order")
    assert work_key(tiny_clips, load_profile("tiny"), "order") == base
    assert len({base, work_key(tiny_clips, load_profile("tiny", pretrain_epochs=8), "order"),
                work_key(tiny_clips, load_profile("tiny"), "transform"),
                work_key(tiny_test_clips, load_profile("tiny"), "order")}) == 4
    with pytest.raises(FileNotFoundError, match="not a clip dataset"):
        work_key(tiny_clips.parent, load_profile("tiny"))


def test_a_bad_sync_interval_is_one_clear_error(s3_server, tmp_path, monkeypatch):
    from sonossl.pipeline.mirror import mirrored

    for text in ("soon", "0"):
        monkeypatch.setenv("SONOSSL_CHECKPOINT_SYNC_SECONDS", text)
        with pytest.raises(ValueError, match=f"SONOSSL_CHECKPOINT_SYNC_SECONDS='{text}': expected a number"):
            with mirrored(tmp_path / "out", f"s3://{s3_server.bucket}/ck/pretrain/key-1"):
                pass


@pytest.mark.slow
def test_pretrain_cli_under_torchrun_resumes_every_rank_from_the_store(s3_server, tiny_clips, tmp_path):
    """`sonossl pretrain --checkpoint-store` under torchrun (2 processes, gloo): rank 0 copies the folder. A
    restarted node (a new, empty folder) pulls it with `artifacts pull --missing-ok` before torchrun, and both ranks
    resume after the last epoch (a rank that started over would wait forever for the other in the all-reduce)."""
    store = f"s3://{s3_server.bucket}/checkpoints/pretrain-job"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)

    def pretrain_ddp(out: Path) -> subprocess.CompletedProcess:
        return run(str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "sonossl.cli", "-q", "pretrain",
                   "--profile", "tiny", "--clips", str(tiny_clips), "--mode", "order", "--out", str(out),
                   "--checkpoint-store", store)

    pull = [sys.executable, "-m", "sonossl.cli", "-q", "artifacts", "pull", "--missing-ok", store]
    proc = run(*pull, str(tmp_path / "first"))  # nothing there yet: not an error, nothing written
    assert proc.returncode == 0 and "nothing at" in proc.stdout and not (tmp_path / "first").exists(), proc.stderr
    assert run(sys.executable, "-m", "sonossl.cli", "artifacts", "pull", store, str(tmp_path / "x")).returncode == 2

    proc = pretrain_ddp(tmp_path / "first")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stored = _objects(s3_server, "checkpoints/pretrain-job/")
    assert stored["encoder.pt"] == (tmp_path / "first/encoder.pt").read_bytes()
    assert "checkpoints/last.pt" in stored and not any(k.split("/")[-1].startswith(".") for k in stored)

    proc = run(*pull, str(tmp_path / "restarted"))
    assert proc.returncode == 0 and (tmp_path / "restarted/checkpoints/last.pt").is_file(), proc.stderr
    proc = pretrain_ddp(tmp_path / "restarted")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming after epoch 2 of 2" in proc.stderr, proc.stderr
    assert json.loads((tmp_path / "restarted/metrics.json").read_text())["world_size"] == 2


def test_pretrain_cli_alone_restores_from_the_store_itself(s3_server, tiny_clips, tmp_path):
    """One process (no torchrun): `--checkpoint-store` restores the folder first, then resumes (it implies
    --resume)."""
    store = f"s3://{s3_server.bucket}/checkpoints/one"
    cmd = [sys.executable, "-m", "sonossl.cli", "-q", "pretrain", "--profile", "tiny", "--clips", str(tiny_clips),
           "--mode", "order", "--checkpoint-store", store, "--out"]
    first = subprocess.run([*cmd, str(tmp_path / "a")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([*cmd, str(tmp_path / "b")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "restored" in again.stderr and "resuming after epoch 2 of 2" in again.stderr, \
        again.stderr
    assert (tmp_path / "b/encoder.pt").read_bytes() == (tmp_path / "a/encoder.pt").read_bytes()
