"""The results report's pretext table: epochs, and the heads it marks as not clearly above chance."""

from __future__ import annotations

import pytest

from sonossl.evaluate.report import near_chance, pretext_table


def metrics(val_clips: int = 434, epochs: int = 8, **acc: float) -> dict:
    chance = {"order_acc": 0.0833, "rotation_acc": 0.3333, "scale_acc": 0.3333, "shear_acc": 0.3333}
    return {"val_clips": val_clips, "epochs": epochs, "val": {f"{h}_acc": v for h, v in acc.items()},
            "chance": {f"{h}_acc": chance[f"{h}_acc"] for h in acc}}


@pytest.mark.parametrize("acc, near", [
    # chance + 2 standard errors over 434 clips: 0.0833 + 2 * sqrt(0.0833 * 0.9167 / 434) = 0.1098 for 12 classes,
    # 0.3333 + 2 * sqrt(0.3333 * 0.6667 / 434) = 0.3786 for 3
    ({"order": 0.07}, ["order"]),       # an order head that never left chance (a screen run at 2e-3)
    ({"order": 0.109}, ["order"]),
    ({"order": 0.111}, []),
    ({"order": 0.341, "rotation": 0.661, "scale": 0.744, "shear": 0.392}, []),  # the pipeline's encoder
    ({"order": 0.352, "rotation": 0.595, "scale": 0.576, "shear": 0.376}, ["shear"]),  # its both-parallel one
    ({"rotation": 0.30, "scale": 0.78, "shear": 0.378}, ["rotation", "shear"]),  # below chance counts too
])
def test_near_chance_is_two_standard_errors_over_the_held_out_clips(acc, near):
    assert near_chance(metrics(**acc)) == near


def test_fewer_held_out_clips_need_a_wider_margin():
    assert near_chance(metrics(val_clips=74, order=0.14)) == ["order"]  # 0.0833 + 2 * 0.0321 = 0.1476
    assert near_chance(metrics(val_clips=434, order=0.14)) == []
    assert near_chance(metrics(val_clips=0, order=0.05)) == []  # no held-out clips: nothing to judge


def test_the_pretext_table_marks_the_heads_near_chance():
    table = pretext_table({"both-sequential": metrics(order=0.341, rotation=0.661, scale=0.744, shear=0.392,
                                                      epochs=24),
                           "order": metrics(order=0.07)})
    assert table[0] == ("| encoder | epochs | order acc (chance) | rotation acc (chance) | scale acc (chance) "
                        "| shear acc (chance) |")
    assert table[2] == "| both-sequential | 24 | 0.341 (0.083) | 0.661 (0.333) | 0.744 (0.333) | 0.392 (0.333) |"
    assert table[3] == "| order | 8 | 0.070 (0.083) * | – | – | – |"
    assert table[-1].startswith("\\* not clearly above chance")
    assert "*" not in "".join(pretext_table({"order": metrics(order=0.3)}))


def _finetune_output(root, name: str, task: str, init: str, runs: list[tuple[str, float, float]]):
    """A finetune output folder ``root/name`` holding a metrics.json with ``runs`` of (method, fraction, macro-F1)."""
    import json

    classes = ["a", "b"]
    test = lambda f1: {"macro_f1": f1, "accuracy": f1, "classes": classes, "confusion": [[1, 0], [0, 1]],  # noqa: E731
                       "per_class": {c: {"f1": f1, "support": 1} for c in classes}}
    m = {"name": name, "task": task, "init": init, "encoder": None if init == "scratch" else "models/pretrain/x",
         "data_version": "v1", "runs": [{"method": me, "fraction": fr, "test": test(f1)} for me, fr, f1 in runs]}
    (root / name).mkdir(parents=True)
    (root / name / "metrics.json").write_text(json.dumps(m))


def test_rows_come_from_what_each_run_was_trained_from_and_unknown_names_get_their_own_row(tmp_path):
    """A run in a folder whose name contradicts its metrics (scratch under `ssl-planes`) is refused, not shown as
    SSL; a name outside the known ones gets a row of its own instead of vanishing."""
    from sonossl.evaluate.report import evaluate

    ft = tmp_path / "ft"
    _finetune_output(ft, "ssl-planes", "planes", "pretrained", [("finetune", 0.05, 0.5)])
    _finetune_output(ft, "scratch-planes", "planes", "scratch", [("finetune", 0.05, 0.3)])
    _finetune_output(ft, "mine-planes", "planes", "pretrained", [("finetune", 0.05, 0.4)])
    evaluate(tmp_path / "pt", ft, tmp_path / "out")
    md = (tmp_path / "out/results.md").read_text()
    assert "| SSL (both-sequential) | – | 0.500 |" in md and "| mine | – | 0.400 |" in md

    bad = tmp_path / "bad"
    _finetune_output(bad, "ssl-planes", "planes", "scratch", [("finetune", 0.05, 0.3)])
    with pytest.raises(ValueError, match=r"ssl-planes/metrics\.json: the folder name says 'ssl' but the run was "
                                         r"trained from scratch"):
        evaluate(tmp_path / "pt", bad, tmp_path / "out-bad")
    odd = tmp_path / "odd"
    _finetune_output(odd, "baseline_planes", "planes", "scratch", [("finetune", 0.05, 0.3)])
    with pytest.raises(ValueError, match=r"baseline_planes/metrics\.json: the folder is not named <init>-<task>"):
        evaluate(tmp_path / "pt", odd, tmp_path / "out-odd")
    other = tmp_path / "other"
    _finetune_output(other, "ssl-saliency", "planes", "pretrained", [("finetune", 0.05, 0.3)])
    with pytest.raises(ValueError, match=r"ssl-saliency/metrics\.json: the folder name says task 'saliency' but "
                                         r"the run is of task 'planes'"):
        evaluate(tmp_path / "pt", other, tmp_path / "out-other")


def test_runs_of_one_task_scored_on_different_test_sets_are_refused_not_tabled_together(tmp_path):
    """An SSL row scored on an independent test set beside a scratch row scored on the test split compared
    nothing; the report named both test sets without saying which row used which."""
    import json

    from sonossl.evaluate.report import evaluate

    ft = tmp_path / "ft"
    _finetune_output(ft, "ssl-planes", "planes", "pretrained", [("finetune", 0.05, 0.5)])
    _finetune_output(ft, "scratch-planes", "planes", "scratch", [("finetune", 0.05, 0.3)])
    sets = {"ssl-planes": {"clips": "data/clips/sim_test", "split": "all", "data_version": "t1", "videos": 64,
                           "frames": 1274},
            "scratch-planes": {"clips": "data/clips/sim", "split": "test", "data_version": "v1", "videos": 10,
                               "frames": 200}}
    for name, test_set in sets.items():
        path = ft / name / "metrics.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "test_set": test_set}))
    with pytest.raises(ValueError, match=r"the planes runs were scored on different test sets, which one table cannot "
                                         r"compare \(scratch-planes: 10 videos, 200 frames: the test split of "
                                         r"data/clips/sim \(version v1\); ssl-planes: 64 videos, 1,274 frames: every "
                                         r"frame of data/clips/sim_test \(version t1\)\); fine-tune them all with the "
                                         r"same --test-clips"):
        evaluate(tmp_path / "pt", ft, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    path = ft / "scratch-planes" / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "test_set": sets["ssl-planes"]}))
    evaluate(tmp_path / "pt", ft, tmp_path / "out")  # one test set: one line naming it
    assert (tmp_path / "out/results.md").read_text().count("Test set: ") == 1


def test_the_per_class_table_and_confusion_plots_use_the_smallest_fraction_ssl_and_scratch_share(tmp_path):
    """An ablation encoder at a fraction below every SSL/scratch one left the per-class table and plots empty."""
    import json

    from sonossl.evaluate.report import evaluate

    ft = tmp_path / "ft"
    _finetune_output(ft, "ssl-planes", "planes", "pretrained", [("finetune", 0.1, 0.4), ("finetune", 0.2, 0.5),
                                                                  ("finetune", 1.0, 0.7)])
    _finetune_output(ft, "scratch-planes", "planes", "scratch", [("finetune", 0.2, 0.3), ("finetune", 1.0, 0.6)])
    _finetune_output(ft, "order-planes", "planes", "pretrained", [("finetune", 0.05, 0.2)])
    evaluate(tmp_path / "pt", ft, tmp_path / "out")
    md = (tmp_path / "out/results.md").read_text()
    assert "### Per-class test F1 at 20% of the training videos" in md  # not 5% (order only), not 10% (SSL only)
    assert "| SSL (both-sequential) | finetune | 0.500 | 0.500 |" in md
    assert "| scratch (random init) | finetune | 0.300 | 0.300 |" in md
    for init in ("ssl", "scratch"):
        assert json.loads((tmp_path / f"out/plots/confusion_{init}.json").read_text())


@pytest.mark.parametrize("content, error", [
    ('{"comment": "notes"}', r"notes-planes/metrics\.json: no `task` \(str\) in it"),
    ("[1, 2]", r"notes-planes/metrics\.json: a JSON object expected, got list"),
    (b"\xff\xfe", r"notes-planes/metrics\.json: not valid JSON"),
])
def test_a_metrics_file_of_another_shape_names_the_file(tmp_path, content, error):
    from sonossl.evaluate.report import evaluate

    _finetune_output(tmp_path / "ft", "ssl-planes", "planes", "pretrained", [("finetune", 0.05, 0.5)])
    (tmp_path / "ft/notes-planes").mkdir()
    path = tmp_path / "ft/notes-planes/metrics.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=error):
        evaluate(tmp_path / "pt", tmp_path / "ft", tmp_path / "out")


def test_a_crossval_file_that_is_not_there_is_an_error_and_readme_markers_out_of_order_are_named(tmp_path):
    from sonossl.evaluate.report import BEGIN, END, evaluate, insert_into_readme

    _finetune_output(tmp_path / "ft", "ssl-planes", "planes", "pretrained", [("finetune", 0.05, 0.5)])
    with pytest.raises(FileNotFoundError, match=r"crossval results .*nope\.json: no such file"):
        evaluate(tmp_path / "pt", tmp_path / "ft", tmp_path / "out", crossval=tmp_path / "nope.json")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{END}\n{BEGIN}\n")
    (tmp_path / "results.md").write_text("table\n")
    with pytest.raises(ValueError, match=r"README\.md: the results block's end marker .* comes before its begin"):
        insert_into_readme(tmp_path / "results.md", readme)


def test_the_crossval_report_lists_each_test_fold_and_the_videos_preprocessing_left_out():
    from sonossl.evaluate.report import crossval_markdown

    cv = {"folds": 2, "dataset": "data/clips/lungs", "classes": ["a", "b"], "videos": 5, "patients": 4,
          "data_version": "v1", "seconds": 60, "rejected": 4,
          "rejects": [{"path": f"videos/{i}.mp4", "reason": "file not found"} for i in range(4)],
          "results": [{"init": "ssl", "method": "probe", "accuracy": 0.8, "fold_accuracy": [1.0, 0.5],
                       "per_class_f1": {"a": 0.8, "b": 0.7}}],
          "fold_runs": [{"test_patients": ["p1", "p2"], "test_videos": 3, "test_videos_per_class": {"a": 2, "b": 1}},
                        {"test_patients": ["p3", "p4"], "test_videos": 2, "test_videos_per_class": {"a": 1, "b": 1}}]}
    md = crossval_markdown(cv)
    assert ("5 videos of 4 patients; clip dataset version v1; 1.0 min on this machine. 4 video(s) of its labels.csv "
            "were left out by preprocessing as unusable (videos/0.mp4: file not found; videos/1.mp4: file not found; "
            "videos/2.mp4: file not found, ...; results.json and the clip dataset's meta.json list them).") in md
    assert ("| test fold | patients | videos | a | b |\n|---|---|---|---|---|\n| 1 | 2 | 3 | 2 | 1 |\n"
            "| 2 | 2 | 2 | 1 | 1 |\n") in md
    # results of an older version (no test_patients, no rejects): the report as it was
    old = {**cv, "rejected": 0, "rejects": [], "fold_runs": [{"test_videos": 3}, {"test_videos": 2}]}
    assert crossval_markdown(old).endswith("1.0 min on this machine.\n")


def test_crossval_metrics_are_keyed_by_the_dataset_cross_validated(tmp_path):
    """`evaluate --crossval` names the metrics after the clip dataset of the cross-validation (they were `pocus/...`
    whatever the dataset)."""
    import json

    from sonossl.evaluate.report import evaluate

    ft = tmp_path / "ft"
    _finetune_output(ft, "ssl-planes", "planes", "pretrained", [("finetune", 0.05, 0.5)])
    result = {"init": "ssl", "method": "finetune", "accuracy": 0.75, "fold_accuracy": [0.5, 1.0],
              "per_class_f1": {"a": 0.8, "b": 0.6}}
    cv = {"dataset": "data/clips/lungs", "data_version": "v2", "folds": 2, "classes": ["a", "b"], "videos": 8,
          "patients": 4, "results": [result]}
    (tmp_path / "cv.json").write_text(json.dumps(cv))
    metrics = evaluate(tmp_path / "pt", ft, tmp_path / "out", crossval=tmp_path / "cv.json")
    assert metrics["crossval/lungs/ssl/finetune"] == {"accuracy": 0.75, "a": 0.8, "b": 0.6}
    assert not [k for k in metrics if k.startswith("pocus/")]
    assert "cross-validation grouped by patient: data/clips/lungs" in (tmp_path / "out/results.md").read_text()
