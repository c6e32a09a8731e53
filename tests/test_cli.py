"""The `sonossl` entry point: expected failures are one clear line and exit status 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

from sonossl.cli import main


def test_help_is_fast_and_lists_the_steps():
    out = subprocess.run([sys.executable, "-m", "sonossl.cli", "--help"], capture_output=True, text=True, check=True)
    for step in ("simulate", "preprocess", "contact-sheet"):
        assert step in out.stdout


def test_missing_raw_dataset_is_one_clear_line(tmp_path, capsys):
    assert main(["-q", "preprocess", "--profile", "tiny", "--raw", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "sonossl preprocess: error:" in err and "nope" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_parameter_file_names_the_field(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("profile: tiny\ntiny:\n  simulate:\n    videos: -1\n    colour: red\n")
    assert main(["simulate", "--params", str(params), "--out", str(tmp_path / "sim")]) == 2
    assert "tiny.simulate: unknown key(s) ['colour']" in capsys.readouterr().err


def test_test_sweeps_need_a_simulate_test_block(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("profile: tiny\ntiny:\n  simulate:\n    videos: 1\n")
    assert main(["simulate", "--test-set", "--params", str(params), "--out", str(tmp_path / "sim")]) == 2
    assert "tiny has no simulate_test block" in capsys.readouterr().err and not (tmp_path / "sim").exists()
