"""Security: checkpoints and exported models load with ``weights_only`` (a crafted pickle that would run code is
refused, naming the file, and runs nothing), and the repository holds no credentials.

(Paths in a labels.csv that leave the dataset root, absolute or through a symlink, are refused in
``tests/test_preprocess.py::test_bad_inputs_are_listed_and_the_good_ones_processed``; S3 keys that would leave a
download's destination, in ``tests/test_storage.py``.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sonossl.train.loop import CheckpointError, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


class _RunsCode:
    """Unpickling this calls ``os.system``: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(path: Path, marker: Path, **payload) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": 1, "bundle_format": 1, **payload, "x": _RunsCode(marker)}, path)
    return path


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    from sonossl.export import load_bundle
    from sonossl.train.pretrain import load_encoder

    marker = tmp_path / "code-ran"
    ckpt = _crafted(tmp_path / "pt" / "checkpoints" / "last.pt", marker, epoch=1)
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt)) + ".*Weights only load failed"):
        load_checkpoint(ckpt)
    encoder = _crafted(tmp_path / "enc" / "encoder.pt", marker)
    with pytest.raises(CheckpointError, match=re.escape(str(encoder))):
        load_encoder(tmp_path / "enc")
    bundle = _crafted(tmp_path / "export" / "model.pt", marker)
    with pytest.raises(CheckpointError, match=re.escape(str(bundle))):
        load_bundle(tmp_path / "export")
    assert not marker.exists()
    # The same file loaded the unsafe way does run the code: the test's payload is real.
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_resume_from_a_crafted_checkpoint_fails_clearly_through_the_cli(tiny_clips, tmp_path):
    marker = tmp_path / "code-ran"
    _crafted(tmp_path / "pt" / "checkpoints" / "last.pt", marker, epoch=1)
    proc = subprocess.run([sys.executable, "-m", "sonossl.cli", "-q", "pretrain", "--profile", "tiny", "--clips",
                           str(tiny_clips), "--mode", "order", "--out", str(tmp_path / "pt"), "--resume"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(tmp_path / "pt" / "checkpoints" / "last.pt") in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


# AWS access key ids and 40-character secret keys assigned to a secret-looking name, private keys.
_SECRETS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"(?i)(secret_access_key|secretkey|secret_key)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+]{40}\b"),
    re.compile(r"-----BEGIN (RSA |EC |OPENSSH )?PRIVATE KEY-----"),
]


def test_no_credentials_in_the_repository():
    # The patterns do catch credentials (built here so that this file holds none).
    assert _SECRETS[0].search("key " + "AKIA" + "Q" * 16) and _SECRETS[2].search("-----BEGIN RSA " + "PRIVATE KEY-----")
    assert _SECRETS[1].search("aws_secret_access_key = " + "wJalrXUtnF" * 3 + "EMI/K7MDEN")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    found = []
    for name in filter(None, files):
        path = REPO / name
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        for pattern in _SECRETS:
            found += [f"{name}: {m.group(0)[:12]}..." for m in pattern.finditer(text) if "EXAMPLE" not in m.group(0)]
    assert not found, f"credentials committed: {found}"
    # DVC remote credentials belong in the environment, or at most in .dvc/config.local, which git never sees.
    config = (REPO / ".dvc/config").read_text()
    assert not re.search(r"(?i)(access_key_id|secret_access_key|session_token)\s*=", config)
    ignored = subprocess.run(["git", "check-ignore", "-q", ".dvc/config.local"], cwd=REPO)
    assert ignored.returncode == 0, ".dvc/config.local must be git-ignored"
