"""params.yaml: profiles load, bad entries fail naming the field, and no name trips DVC's run cache."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from sonossl.config import PROFILES, Params, ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_of_the_repository_loads(profile):
    params = load_params(REPO / "params.yaml", profile)
    assert params.profile == profile and params.simulate.videos >= 1 and params.preprocess.frame_size >= 8
    assert "sim" in params.datasets


def test_no_parameter_is_named_like_a_key_dvc_leaves_out_of_its_run_cache():
    names = set()
    for f in dataclasses.fields(Params):
        tp = typing.get_type_hints(Params)[f.name]
        if dataclasses.is_dataclass(tp):
            for sub in dataclasses.fields(tp):
                names.add(sub.name)
                inner = typing.get_type_hints(tp)[sub.name]
                if dataclasses.is_dataclass(inner):
                    names |= {g.name for g in dataclasses.fields(inner)}
    assert names and not names & {"size", "nfiles"}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["tiny"]["preprocess"].update(frame_sise=3), "tiny.preprocess: unknown key(s) ['frame_sise']"),
        (lambda d: d["tiny"]["simulate"].update(videos="many"), "tiny.simulate.videos: expected an integer"),
        (lambda d: d["tiny"]["preprocess"].update(split={"train": "most"}), "tiny.preprocess.split.train"),
        (lambda d: d.update(profile="huge"), "profile 'huge' is not one of"),
        (lambda d: d["tiny"].update(train={}), "unknown section(s) ['train']"),
        (lambda d: d["tiny"]["simulate_test"].update(vidoes=9), "tiny.simulate_test: unknown key(s) ['vidoes']"),
        (lambda d: d["tiny"]["simulate_test"].update(seed=0), "tiny.simulate_test.seed: must differ"),
        (lambda d: d.update(train=["pocus", "mine"]),
         "train[1]: 'mine' is not a dataset; list it under `datasets:`"),
        (lambda d: d.update(train=["pocus", "pocus"]), "train[1]: 'pocus' is listed twice"),
        (lambda d: d.update(train="pocus"), "train: expected a list"),
        (lambda d: d.update(crossval_datasets=["mine"]),
         "crossval_datasets[0]: 'mine' is not a dataset; list it under `datasets:`"),
        (lambda d: d.update(crossval_datasets=["pocus", "pocus"]), "crossval_datasets[1]: 'pocus' is listed twice"),
        (lambda d: d.update(train_saliency=["sim"]),
         "train_saliency[0]: 'sim' is not under `train:` (none listed); list it there so that"),
        (lambda d: d.update(train=["sim"], train_saliency=["sim", "sim"]),
         "train_saliency[1]: 'sim' is listed twice"),
        # a top-level key misspelled would be ignored: train_salency, crossval_dataset, profle
        (lambda d: d.update(train_salency=["sim"]), "unknown top-level key(s) ['train_salency']; valid keys are"),
        (lambda d: d.update(profle="gpu"), "unknown top-level key(s) ['profle']"),
        (lambda d: d.update(tiny=[1, 2]), "tiny: expected a mapping of sections, got list"),
        # a text value outside its choices fails at load time, not hours later in the stage that reads it
        (lambda d: d["tiny"]["finetune"].update(head_init="probe_ft"),
         "tiny.finetune.head_init: 'probe_ft' is not one of ['random', 'probe']"),
        (lambda d: d["tiny"]["pretrain"]["encoder"].update(name="resnet-18"),
         "tiny.pretrain.encoder.name: 'resnet-18' is not one of ['resnet18', 'small_cnn']"),
        (lambda d: d["tiny"]["pretrain"]["encoder"].update(init="kaiming"),
         "tiny.pretrain.encoder.init: 'kaiming' is not one of [null, 'torchvision', 'pytorch']"),
        (lambda d: d["tiny"]["pretrain"]["encoder"].update(init="None"),  # YAML's null is `null`, not None
         "tiny.pretrain.encoder.init: 'None' is not one of [null, 'torchvision', 'pytorch']"),
        (lambda d: d["tiny"]["finetune"].update(scratch_init="kaiming"),
         "tiny.finetune.scratch_init: 'kaiming' is not one of [null, 'torchvision', 'pytorch']"),
        (lambda d: d["tiny"].setdefault("export", {}).update(select_metric="val_f1"),
         "tiny.export.select_metric: 'val_f1' is not one of ['val_macro_f1'"),
        (lambda d: d["tiny"].setdefault("export", {}).update(saliency_metric="val_kld"),
         "tiny.export.saliency_metric: 'val_kld' is not one of"),
        (lambda d: d["tiny"]["finetune"].update(head_init=None), "tiny.finetune.head_init: expected text, got null"),
        (lambda d: d["tiny"]["pretrain"].update(lr="1e-3"),
         "tiny.pretrain.lr: expected a number, got '1e-3' (YAML reads 1e-3 as text: write it with a decimal point"),
        # YAML's .nan and .inf: a NaN passes every range check, and a NaN rotation sampled the padding it was to hide
        (lambda d: d["tiny"]["pretrain"].update(lr=float("inf")),
         "tiny.pretrain.lr: expected a finite number, got inf"),
        (lambda d: d["tiny"]["pretrain"].setdefault("transform", {}).update(rotations=[float("nan"), 0.0, 15.0]),
         "tiny.pretrain.transform.rotations[0]: expected a finite number, got nan"),
    ],
)
def test_bad_entries_fail_naming_the_file_and_field(tmp_path, edit, message):
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    doc["profile"] = "tiny"
    edit(doc)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert message in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("profile", PROFILES)
def test_the_test_sweeps_are_the_simulate_block_with_the_test_keys_replaced(profile):
    doc = yaml.safe_load((REPO / "params.yaml").read_text())[profile]
    params = load_params(REPO / "params.yaml", profile)
    changed = {k: v for k, v in dataclasses.asdict(params.simulate_test).items()
               if v != getattr(params.simulate, k)}
    assert changed and set(changed) <= set(doc["simulate_test"]) and changed["seed"] != params.simulate.seed


def test_a_key_given_twice_is_refused_not_the_first_one_dropped(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `preprocess:` block in a profile replaced the first
    whole (its max_frames back to the default) without a word."""
    text = (REPO / "params.yaml").read_text().replace("profile: default", "profile: tiny", 1)
    start = text.index("\ntiny:")
    block = text.index("\n  preprocess:", start)
    text = text[:block] + "\n  preprocess:\n    frame_size: 32" + text[block:]
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=rf"{path}: line \d+: key 'preprocess' given twice in one mapping \(first on "
                                          r"line \d+\); YAML would keep only the last"):
        load_params(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ParamsError, match="parameter file not found"):
        load_params(tmp_path / "nope.yaml")


def test_a_setting_out_of_range_names_the_file_and_a_fraction_given_twice_is_refused(tmp_path, tiny_clips, capsys):
    """Ranges are checked by the step that uses a setting (it does not know the file): the CLI names the file; a
    fraction listed twice trained the same runs twice, and k=2 frames have one order up to reversal."""
    from sonossl.cli import main
    from sonossl.config import task_fractions

    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    doc["profile"] = "tiny"
    doc["tiny"]["pretrain"]["epochs"] = -1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["pretrain", "--params", str(path), "--clips", str(tiny_clips), "--out", str(tmp_path / "pt")]) == 2
    assert f"sonossl pretrain: error: {path}: pretrain.epochs: must be at least 1, got -1" in capsys.readouterr().err
    doc["tiny"]["pretrain"].update(epochs=1, k=2)
    path.write_text(yaml.safe_dump(doc))
    assert main(["pretrain", "--params", str(path), "--clips", str(tiny_clips), "--out", str(tmp_path / "pt")]) == 2
    assert "pretrain.k: must be at least 3 (2 frames have a single order up to reversal" in capsys.readouterr().err
    assert not (tmp_path / "pt").exists()
    doc["tiny"]["pretrain"]["k"] = 4
    doc["tiny"]["finetune"]["fractions"] = [0.5, 0.5]
    path.write_text(yaml.safe_dump(doc))
    assert main(["finetune", "--params", str(path), "--clips", str(tiny_clips), "--out", str(tmp_path / "ft")]) == 2
    assert "finetune.fractions: must be a non-empty list of distinct fractions" in capsys.readouterr().err
    params = load_params(REPO / "params.yaml", "tiny").finetune
    for given, message in [("0.5,0.5", "a fraction given twice"), ("0,0.5", "fractions of the training videos in (0"),
                           ("nan", "in (0, 1]"), ("half", "give all, ablation, or fractions")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            task_fractions(params, "planes", given)
