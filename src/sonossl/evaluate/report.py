"""The evaluate step: one results report from every pretrain and finetune output.

Reads ``<pretrain>/<encoder>/metrics.json`` and ``<finetune>/<name>/metrics.json`` (and ``crossval`` results when
given; with ``tasks``, the finetune outputs of those tasks only) and writes:

- ``results.md``: the tables the README shows (plane detection, or classification by your own videos' labels, by
  initialisation, method and label fraction; per-class F1 at the smallest fraction; saliency; pretext accuracy per
  head against chance, a head that is not clearly above chance marked, and logged as a warning; the
  cross-validation by patient, POCUS or yours);
- ``metrics.json``: the headline numbers, flat, for ``dvc metrics show``;
- ``plots/confusion_<init>.json``: test confusion pairs of the fine-tune at the smallest fraction, for ``dvc plots``.

    evaluate("models/pretrain", "models/finetune", "reports")
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sonossl.atomic import atomic_write_text

# finetune output names: <init>-<task>; init names as they appear in the tables
INITS = {"ssl": "SSL (both-sequential)", "sequential": "both-sequential (ablation)", "order": "order only",
         "transform": "transform only", "parallel": "both-parallel", "scratch": "scratch (random init)"}
SALIENCY_KEYS = ("kld", "cc", "nss", "sim", "auc_judd")
PRETEXT_HEADS = ("order", "rotation", "scale", "shear")
NEAR_CHANCE = "not clearly above chance"

log = logging.getLogger(__name__)


def _read(path: Path, required: dict[str, type] | None = None) -> dict[str, Any]:
    """A JSON object from ``path`` with the ``required`` keys of the given types; an error names the file."""
    try:
        m = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); rerun the stage that writes it") from None
    if not isinstance(m, dict):
        raise ValueError(f"{path}: a JSON object expected, got {type(m).__name__}; rerun the stage that writes it")
    for key, kind in (required or {}).items():
        if not isinstance(m.get(key), kind):
            raise ValueError(f"{path}: no `{key}` ({kind.__name__}) in it: not the output of the step this report "
                             "reads; rerun that step, or move the file out of the folder")
    return m


FINETUNE_KEYS = {"task": str, "runs": list}
PRETRAIN_KEYS = {"val": dict, "chance": dict}
CROSSVAL_KEYS = {"results": list, "classes": list, "dataset": str}


def _runs(finetune: dict[str, dict], folder: Path | None = None) -> dict[tuple[str, str, str, float], dict]:
    """Every run of the finetune outputs by (initialisation, task, method, fraction). An output's folder is named
    ``<init>-<task>`` (dvc.yaml: ``ssl-planes``, ``scratch-saliency``, ``order-planes``...): the initialisation is
    read from the name and must agree with what the output says it was trained from (``init``: scratch or
    pretrained) and its task, so that a run in a misnamed folder is not reported under another row."""
    out = {}
    for name, m in finetune.items():
        init, _, task = name.rpartition("-")
        where = f"{folder / name / 'metrics.json'}" if folder else name
        if not init:
            raise ValueError(f"{where}: the folder is not named <init>-<task> (ssl-planes, scratch-saliency...), "
                             "which is how the report tells the runs apart; rename it")
        if task != m["task"]:
            raise ValueError(f"{where}: the folder name says task {task!r} but the run is of task {m['task']!r}; "
                             "finetune outputs are named <init>-<task>")
        if "init" in m and (init == "scratch") != (m["init"] == "scratch"):
            raise ValueError(f"{where}: the folder name says {init!r} but the run was trained from "
                             f"{m['init']} ({m.get('encoder') or 'random init'}); finetune outputs are named "
                             "<init>-<task>, with init 'scratch' for random initialisation")
        for i, r in enumerate(m["runs"]):
            if not (isinstance(r, dict) and isinstance(r.get("method"), str)
                    and isinstance(r.get("fraction"), (int, float))):
                raise ValueError(f"{where}: runs[{i}] has no `method` and `fraction`; rerun the step that wrote it")
            out[(init, m["task"], r["method"], r["fraction"])] = r
    return out


def _inits(runs: dict) -> list[str]:
    """The initialisations of ``runs`` in the tables' order: those of ``INITS`` first, then any other by name."""
    seen = {k[0] for k in runs}
    return [i for i in INITS if i in seen] + sorted(seen - set(INITS))


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(f: float) -> str:
    return f"{f * 100:g}%"


def planes_table(runs: dict, fractions: list[float]) -> list[str]:
    head = ["encoder"] + [f"{m} {_pct(f)}" for m in ("probe", "finetune") for f in fractions]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for init in _inits(runs):
        label = INITS.get(init, init)
        cells = []
        for m in ("probe", "finetune"):
            for f in fractions:
                r = runs.get((init, "planes", m, f))
                cells.append(_fmt(r["test"]["macro_f1"]) if r and r.get("test") else "–")
        if any(c != "–" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def classification_title(runs: dict) -> str:
    """"Standard-plane detection" for the simulator's planes; on other classes (your own videos' labels) "Frame
    classification (<classes>)"."""
    from sonossl.data.planes import CLASSES

    classes = {c for (_, task, _, _), r in runs.items() if task == "planes" and r.get("test")
               for c in r["test"]["per_class"]}
    if classes <= set(CLASSES):
        return "Standard-plane detection"
    return f"Frame classification ({', '.join(sorted(classes))})"


def per_class_table(runs: dict, fraction: float) -> list[str]:
    rows = [(init, m, runs.get((init, "planes", m, fraction))) for init in ("ssl", "scratch")
            for m in ("probe", "finetune")]
    rows = [r for r in rows if r[2] and r[2].get("test")]
    if not rows:
        return []
    classes = list(rows[0][2]["test"]["per_class"])
    head = ["encoder", "method"] + classes + ["macro-F1", "accuracy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for init, m, r in rows:
        t = r["test"]
        pcs = [_fmt(t["per_class"][c]["f1"]) if t["per_class"][c]["support"] else "n/a" for c in classes]
        lines.append(f"| {INITS[init]} | {m} | " + " | ".join(pcs) + f" | {_fmt(t['macro_f1'])} | "
                     f"{_fmt(t['accuracy'])} |")
    support = rows[0][2]["test"]["per_class"]
    lines.append("")
    lines.append("Test frames per class: " + ", ".join(f"{c} {support[c]['support']}" for c in classes) + ".")
    return lines


def saliency_table(runs: dict) -> list[str]:
    rows = sorted(((k, r) for k, r in runs.items() if k[1] == "saliency" and r.get("test")),
                  key=lambda kr: (kr[0][3], list(INITS).index(kr[0][0]) if kr[0][0] in INITS else 99))
    if not rows:
        return []
    head = ["encoder", "labels", "KLD ↓", "CC ↑", "NSS ↑", "SIM ↑", "AUC-Judd ↑"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (init, _, _, frac), r in rows:
        lines.append(f"| {INITS.get(init, init)} | {_pct(frac)} | " +
                     " | ".join(_fmt(r["test"][k]) for k in SALIENCY_KEYS) + " |")
    return lines


def near_chance(m: dict[str, Any]) -> list[str]:
    """The heads of one pretrain output whose held-out accuracy is not clearly above chance: below chance plus two
    binomial standard errors over its ``val_clips`` held-out clips (at 434 clips: 0.110 for 12 order classes, 0.378
    for 3 classes). A head can stay at chance while the others learn (the order head did in 2 of 18 screen runs at
    the default rate, README), and its encoder is then a different one from what the pipeline means to ship."""
    n = m.get("val_clips") or 0
    heads = []
    for h in PRETEXT_HEADS:
        v, c = m["val"].get(f"{h}_acc"), m["chance"].get(f"{h}_acc")
        if v is not None and c is not None and n > 0 and v < c + 2 * math.sqrt(c * (1 - c) / n):
            heads.append(h)
    return heads


def pretext_table(pretrain: dict[str, dict]) -> list[str]:
    head = ["encoder", "epochs"] + [f"{h} acc (chance)" for h in PRETEXT_HEADS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    flagged = False
    for mode, m in pretrain.items():
        near = near_chance(m)
        flagged |= bool(near)
        cells = []
        for h in PRETEXT_HEADS:
            v, c = m["val"].get(f"{h}_acc"), m["chance"].get(f"{h}_acc")
            cells.append("–" if v is None else f"{v:.3f} ({c:.3f})" + (" *" if h in near else ""))
        lines.append(f"| {mode} | {m.get('epochs', '–')} | " + " | ".join(cells) + " |")
    if flagged:
        lines += ["", f"\\* {NEAR_CHANCE}: below chance plus two binomial standard errors over the held-out clips."]
    return lines


def crossval_table(cv: dict) -> list[str]:
    """One row per encoder and method; with a refit (``accuracy_selected`` in the results) a column with the video
    accuracy of the model chosen on the inner validation videos, before it was fitted again; with ``flip_test``
    (``by_view``) one with the scored model's accuracy from the test frames alone, without their mirrors."""
    refit = any("accuracy_selected" in r for r in cv["results"])
    views = any("by_view" in r for r in cv["results"])
    head = ["encoder", "method", "video accuracy", *(["before the refit"] if refit else []),
            *(["frames alone"] if views else []), "per-fold accuracy", *(f"F1 {c}" for c in cv["classes"])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in cv["results"]:
        folds = ", ".join(f"{a:.2f}" for a in r["fold_accuracy"])
        before = [_fmt(r["accuracy_selected"]) if "accuracy_selected" in r else "–"] if refit else []
        alone = [_fmt(r["by_view"]["frames"]) if "by_view" in r else "–"] if views else []
        lines.append("| " + " | ".join([r["init"], r["method"], _fmt(r["accuracy"]), *before, *alone, folds,
                                        *(_fmt(r["per_class_f1"][c]) for c in cv["classes"])]) + " |")
    return lines


def crossval_markdown(cv: dict) -> str:
    minutes = cv.get("seconds", 0) / 60
    opts = cv.get("params", {}).get("crossval", {})
    how = ("Each fold's SSL encoder was pretrained on all its training videos, inner validation videos included "
           "(unlabelled; never on its test videos). " if opts.get("pretrain_on_validation") else "")
    how += ("The probe and the fine-tune chosen on each fold's inner validation videos (L2 strength, epoch) were "
            "fitted again on its training and validation videos together; scored: the refit models. "
            if opts.get("refit") else "")
    how += ("The fine-tunes drew each epoch's frames from every frame of their training videos, each video equally "
            "likely. " if opts.get("fresh_frames") else "")
    how += ("Each test frame was classified as it is and mirrored left-right, its probabilities the mean of the "
            "two (\"frames alone\": without the mirrors). " if opts.get("flip_test") else "")
    left_out = ""
    if cv.get("rejected"):
        shown = "; ".join(f"{r['path']}: {r['reason']}" for r in cv.get("rejects", [])[:3])
        more = ", ..." if cv["rejected"] > 3 else ""
        left_out = (f" {cv['rejected']} video(s) of its labels.csv were left out by preprocessing as unusable "
                    f"({shown}{more}; results.json and the clip dataset's meta.json list them).")
    return "\n".join([
        f"### Video classification, {cv['folds']}-fold cross-validation grouped by patient: {cv['dataset']}", "",
        *crossval_table(cv), "",
        f"{how}{cv['videos']} videos of {cv['patients']} patients; clip dataset version {cv['data_version']}; "
        f"{minutes:.1f} min on this machine.{left_out}", "", *crossval_folds_table(cv)])


def crossval_folds_table(cv: dict) -> list[str]:
    """Per test fold: its patients and videos, per class (outputs of older versions record none: no table)."""
    runs = cv.get("fold_runs", [])
    if not runs or any("test_patients" not in r for r in runs):
        return []
    classes = cv["classes"]
    lines = ["| test fold | patients | videos | " + " | ".join(classes) + " |", "|" + "---|" * (3 + len(classes))]
    for f, r in enumerate(runs):
        per = r["test_videos_per_class"]
        lines.append(f"| {f + 1} | {len(r['test_patients'])} | {r['test_videos']} | "
                     + " | ".join(str(per.get(c, 0)) for c in classes) + " |")
    return [*lines, "", "Each fold's test patients are listed in its results.json (`fold_runs[].test_patients`).", ""]


def unique_test_sets(finetune: dict[str, dict]) -> list[dict[str, Any]]:
    """The distinct ``test_set`` records of the finetune outputs (older outputs have none)."""
    out: list[dict[str, Any]] = []
    for m in finetune.values():
        if m.get("test_set") and m["test_set"] not in out:
            out.append(m["test_set"])
    return out


def _check_one_test_set(finetune: dict[str, dict], finetune_dir: Path) -> None:
    """The runs of a task share one table, so they must have been scored on one test set (older outputs, which
    record none, are not compared); ValueError naming each run's otherwise."""
    for task in sorted({m["task"] for m in finetune.values()}):
        sets: dict[str, list[str]] = {}
        for name, m in finetune.items():
            if m["task"] == task and m.get("test_set"):
                sets.setdefault(json.dumps(m["test_set"], sort_keys=True), []).append(name)
        if len(sets) > 1:
            listed = "; ".join(f"{', '.join(names)}: {describe_test_set(json.loads(key))}"
                               for key, names in sets.items())
            raise ValueError(f"{finetune_dir}: the {task} runs were scored on different test sets, which one table "
                             f"cannot compare ({listed}); fine-tune them all with the same --test-clips, or all "
                             "without")


def describe_test_set(t: dict[str, Any]) -> str:
    """One line on where test scores come from, from a finetune output's ``test_set``."""
    what = "the test split of" if t["split"] == "test" else "every frame of"
    return f"{t['videos']} videos, {t['frames']:,} frames: {what} {t['clips']} (version {t['data_version']})"


def confusion_pairs_from_matrix(matrix: list[list[int]], classes: list[str]) -> list[dict[str, str]]:
    return [{"actual": classes[i], "predicted": classes[j]}
            for i, row in enumerate(matrix) for j, n in enumerate(row) for _ in range(int(n))]


def evaluate(pretrain_dir: str | Path, finetune_dir: str | Path, out_dir: str | Path,
             crossval: str | Path | None = None, tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """The report of every run in ``finetune_dir`` (only those of ``tasks``, when given: each must have one)."""
    pretrain_dir, finetune_dir, out_dir = Path(pretrain_dir), Path(finetune_dir), Path(out_dir)
    pretrain = {p.parent.name: _read(p, PRETRAIN_KEYS) for p in sorted(pretrain_dir.glob("*/metrics.json"))}
    finetune = {p.parent.name: _read(p, FINETUNE_KEYS) for p in sorted(finetune_dir.glob("*/metrics.json"))}
    if not finetune:
        raise FileNotFoundError(f"{finetune_dir}: no */metrics.json; run the finetune stages first")
    if tasks is not None:
        finetune = {name: m for name, m in finetune.items() if m["task"] in tasks}
        missing = sorted(set(tasks) - {m["task"] for m in finetune.values()})
        if missing:
            raise FileNotFoundError(f"{finetune_dir}: no finetune output for the {', '.join(missing)} task(s)")
    _check_one_test_set(finetune, finetune_dir)
    runs = _runs(finetune, finetune_dir)
    fractions = sorted({k[3] for k in runs if k[1] == "planes"})
    # the per-class table and the confusion plots compare SSL with scratch: at the smallest fraction both have (an
    # ablation encoder's smaller fraction would leave them empty)
    by_init = [{k[3] for k in runs if k[1] == "planes" and k[0] == init} for init in ("ssl", "scratch")]
    compared = sorted(set.intersection(*by_init) or set.union(*by_init))  # both; else the one there is
    smallest = compared[0] if compared else None
    data_versions = sorted({m["data_version"] for m in finetune.values()})

    md = [f"### {classification_title(runs)}: test macro-F1", "", *planes_table(runs, fractions), ""]
    if smallest is not None:
        md += [f"### Per-class test F1 at {_pct(smallest)} of the training videos", "",
               *per_class_table(runs, smallest), ""]
    sal = saliency_table(runs)
    if sal:
        md += ["### Saliency prediction: test scores", "", *sal, ""]
    if pretrain:
        md += ["### Pretext accuracy on held-out videos", "", *pretext_table(pretrain), ""]
        for mode, m in pretrain.items():
            for h in near_chance(m):
                log.warning("pretrain %s: held-out %s accuracy %.3f is %s (%.3f, %d clips): this encoder may not "
                            "have learned that task; check its training curves, or pretrain again with another seed "
                            "or a lower rate", mode, h, m["val"][f"{h}_acc"], NEAR_CHANCE, m["chance"][f"{h}_acc"],
                            m["val_clips"])
    if crossval is not None and not Path(crossval).is_file():
        raise FileNotFoundError(f"crossval results {crossval}: no such file (the output of `sonossl crossval`)")
    cv = _read(Path(crossval), CROSSVAL_KEYS) if crossval is not None else None
    if cv:
        md += [crossval_markdown(cv)]
    md.append(f"Clip dataset version(s): {', '.join(data_versions)}.")
    md += [f"Test set: {describe_test_set(t)}." for t in unique_test_sets(finetune)]

    metrics: dict[str, Any] = {}
    for (init, task, method, frac), r in sorted(runs.items()):
        if r.get("test"):
            key = f"{task}/{init}/{method}@{frac:g}"
            metrics[key] = ({"macro_f1": r["test"]["macro_f1"], "accuracy": r["test"]["accuracy"]}
                            if task == "planes" else {k: r["test"][k] for k in SALIENCY_KEYS})
    for mode, m in pretrain.items():
        metrics[f"pretext/{mode}"] = m["val"] | {"chance_" + k: v for k, v in m["chance"].items()}
    if cv:
        name = Path(cv["dataset"]).name  # the clip dataset's folder: pocus, or one of yours
        for r in cv["results"]:
            metrics[f"crossval/{name}/{r['init']}/{r['method']}"] = {"accuracy": r["accuracy"], **r["per_class_f1"]}

    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    for init in ("ssl", "scratch"):
        r = runs.get((init, "planes", "finetune", smallest))
        pairs = confusion_pairs_from_matrix(r["test"]["confusion"], r["test"]["classes"]) if r and r.get("test") else []
        atomic_write_text(out_dir / "plots" / f"confusion_{init}.json", json.dumps(pairs) + "\n")
    atomic_write_text(out_dir / "results.md", "\n".join(md) + "\n")
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


BEGIN, END = "<!-- results:begin (make results) -->", "<!-- results:end -->"


def insert_into_readme(results_md: str | Path, readme: str | Path, extra: list[str | Path] = ()) -> Path:
    """Replace the README's results block (between the markers) with ``results.md`` and the ``extra`` reports that
    exist (the POCUS cross-validation), atomically."""
    results_md, readme = Path(results_md), Path(readme)
    body = "\n".join([results_md.read_text().strip()] + [Path(e).read_text().strip() for e in extra
                                                           if Path(e).is_file()])
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme}: no results block; add the lines {BEGIN!r} and {END!r} where the table goes")
    head, rest = text.split(BEGIN, 1)
    if END not in rest:
        raise ValueError(f"{readme}: the results block's end marker {END!r} comes before its begin marker {BEGIN!r}")
    _, tail = rest.split(END, 1)
    return atomic_write_text(readme, f"{head}{BEGIN}\n{body}\n{END}{tail}")
