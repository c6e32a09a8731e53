"""The `sonossl` entry point: expected failures are one clear line and exit status 2, never a traceback."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sonossl.cli import main

REPO = Path(__file__).resolve().parents[1]


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


def test_an_unexpected_error_exits_2_with_its_traceback_never_1(tmp_path, capsys, monkeypatch):
    """1 is an answer for some commands (`drift`: drift found): a crash must not read as one."""
    import sonossl.monitor.drift as drift

    def crash(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(drift, "drift_report", crash)
    assert main(["drift", "--model-dir", str(tmp_path), "--log", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("sonossl drift: error: KeyError: 'boom'")


def test_the_help_says_which_profile_and_when_parameters_are_read(capsys):
    for argv, said in ((["pipeline", "run-local"], "(default: tiny; the file's `profile:` is not read)"),
                       (["evaluate"], "read only with --train-dataset"),
                       (["pretrain"], "(default: the file's `profile:`)")):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        assert said in " ".join(capsys.readouterr().out.split()), argv


def test_bad_parameter_file_names_the_field(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("profile: tiny\ntiny:\n  simulate:\n    videos: -1\n    colour: red\n")
    assert main(["simulate", "--params", str(params), "--out", str(tmp_path / "sim")]) == 2
    assert "tiny.simulate: unknown key(s) ['colour']" in capsys.readouterr().err


def test_the_parameter_file_is_the_working_directorys_else_sonossl_params(tmp_path, capsys, monkeypatch):
    """The image's case: `docker run -w /work IMAGE sonossl simulate ...` in a folder without a params.yaml reads
    $SONOSSL_PARAMS (the image's own copy); a params.yaml in the working directory (a DVC repo's) comes first."""
    from sonossl.cli import build_parser

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SONOSSL_PARAMS", raising=False)
    assert main(["simulate", "--out", "sim"]) == 2
    assert "params.yaml: parameter file not found" in capsys.readouterr().err
    monkeypatch.setenv("SONOSSL_PARAMS", str(REPO / "params.yaml"))
    assert build_parser().parse_args(["simulate", "--out", "sim"]).params == REPO / "params.yaml"
    (tmp_path / "params.yaml").write_text("profile: tiny\n")
    assert build_parser().parse_args(["simulate", "--out", "sim"]).params == Path("params.yaml")
    assert build_parser().parse_args(["simulate", "--out", "sim", "--params", "p.yaml"]).params == Path("p.yaml")


def test_bad_fractions_name_the_option(tmp_path, capsys):
    assert main(["finetune", "--profile", "tiny", "--clips", str(tmp_path), "--out", str(tmp_path / "ft"),
                 "--fractions", "0.05,5%"]) == 2
    assert "sonossl finetune: error: --fractions 0.05,5%: give all, ablation, or fractions" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()


def test_test_sweeps_need_a_simulate_test_block(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("profile: tiny\ntiny:\n  simulate:\n    videos: 1\n")
    assert main(["simulate", "--test-set", "--params", str(params), "--out", str(tmp_path / "sim")]) == 2
    assert "tiny has no simulate_test block" in capsys.readouterr().err and not (tmp_path / "sim").exists()


def test_train_dataset_gives_export_and_evaluate_the_tasks_params_lists_for_it(tmp_path, tiny_export, tiny_clips,
                                                                                 tiny_params, capsys):
    """`--train-dataset NAME` (the train-* stages): the planes task, and saliency only while NAME is under
    `train_saliency:`, which then needs a saliency run; a NAME not under `train:` is one clear line."""
    both = tiny_export.parent / "finetune"  # ssl-planes and ssl-saliency
    planes_only = tmp_path / "planes_only"
    planes_only.mkdir()
    (planes_only / "ssl-planes").symlink_to(both / "ssl-planes")
    params = tmp_path / "params.yaml"

    def run(step: str, finetune: Path, name: str, out: Path, saliency: bool) -> int:
        doc = yaml.safe_load((REPO / "params.yaml").read_text())
        doc.update(profile="tiny", datasets={"sweeps": "data/raw/sweeps"}, train=["sweeps"],
                   train_saliency=["sweeps"] if saliency else [])
        params.write_text(yaml.safe_dump(doc, sort_keys=False))
        where = ["--clips", str(tiny_clips)] if step == "export" else ["--pretrain", str(tmp_path / "none")]
        return main([step, "--params", str(params), *where, "--finetune", str(finetune), "--out", str(out),
                     "--train-dataset", name])

    # Off train_saliency: the saliency run in the folder is left out of the export and the report.
    assert run("export", both, "sweeps", tmp_path / "export", saliency=False) == 0
    assert json.loads((tmp_path / "export/model_card.json").read_text())["saliency"] is None
    assert run("evaluate", both, "sweeps", tmp_path / "report", saliency=False) == 0
    assert "Saliency" not in (tmp_path / "report/results.md").read_text()
    # On it: a folder without a saliency run fails, naming it; nothing is written.
    capsys.readouterr()
    for step in ("export", "evaluate"):
        assert run(step, planes_only, "sweeps", tmp_path / f"{step}2", saliency=True) == 2
        err = capsys.readouterr().err
        assert f"{planes_only}: no finetune output for the saliency task" in err, err
        assert not (tmp_path / f"{step}2").exists()
    assert run("export", both, "other", tmp_path / "export3", saliency=True) == 2
    assert f"{params}: --train-dataset: 'other' is not under `train:` (sweeps)" in capsys.readouterr().err
    from sonossl.export import export

    for tasks in (["saliency"], ["planes", "salience"]):  # the library's own check of its tasks
        with pytest.raises(ValueError, match=r"export bundles planes \(the served classifier\) and optionally"):
            export(tiny_clips, both, tmp_path / "export4", tiny_params, tasks=tasks)
    assert not (tmp_path / "export4").exists()


def test_scratch_starts_as_finetune_scratch_init_says(tiny_clips, tmp_path, monkeypatch):
    """``finetune.scratch_init`` gives the scratch encoder its own initialisation, in ``sonossl finetune`` and in the
    pipeline's finetune step alike; null leaves it ``pretrain.encoder.init``'s (the tiny profile's small_cnn:
    pytorch), and the pretrained encoder's spec is not touched."""
    from sonossl.config import load_params, scratch_spec
    from sonossl.pipeline.steps import PARAMS_ENV, finetune_step
    from sonossl.train.loop import load_checkpoint

    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    doc["tiny"]["finetune"]["scratch_init"] = "torchvision"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc))
    params = load_params(path, "tiny")
    assert scratch_spec(params) == {**dataclasses.asdict(params.pretrain.encoder), "init": "torchvision"}
    assert params.pretrain.encoder.init is None
    assert scratch_spec(load_params(REPO / "params.yaml", "tiny"))["init"] is None  # null: the network's own

    assert main(["-q", "finetune", "--params", str(path), "--profile", "tiny", "--clips", str(tiny_clips),
                 "--out", str(tmp_path / "cli"), "--fractions", "1"]) == 0
    monkeypatch.setenv(PARAMS_ENV, str(path))
    finetune_step(tiny_clips, tmp_path / "step", "tiny", "planes", "scratch-planes", epochs=1)
    monkeypatch.setenv(PARAMS_ENV, str(REPO / "params.yaml"))
    finetune_step(tiny_clips, tmp_path / "own", "tiny", "planes", "scratch-planes", epochs=1)
    inits = {name: load_checkpoint(tmp_path / name / "model.pt")["encoder"]["init"] for name in ("cli", "step", "own")}
    assert inits == {"cli": "torchvision", "step": "torchvision", "own": "pytorch"}
