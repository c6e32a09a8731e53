"""Videos sent to a running endpoint, the answers collected per frame: ``sonossl infer``.

Each video goes through ``Client.infer_long_video`` (decoded here, one sector crop, parts of at most
``frames_per_request`` frames), so a video of any length works against an endpoint's default frame limit. A folder
holding ``labels.csv`` is a raw dataset: its listed videos are sent, and their labels kept beside the answers.

    videos = list_videos([Path("data/raw/sim_test"), Path("scan.mp4")])   # [(path, label or None), ...]
    frames, failed = infer_videos(client, videos)                          # one row a frame; {video: reason}
    summary = per_video(frames)                                            # one row a video
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from sonossl.data.clips import _inside


def list_videos(inputs: list[Path]) -> list[tuple[Path, str | None]]:
    """The videos to send, in order, with their labels where a raw dataset's labels.csv gives them; ValueError
    naming an input that is neither a file nor a folder holding labels.csv, a labels.csv without a path column or
    with a path outside its folder (as preprocess refuses it), or a video listed twice (its frames would be counted
    twice under one name)."""
    videos: list[tuple[Path, str | None]] = []
    seen: dict[Path, str] = {}
    for item in inputs:
        if item.is_file():
            rows = [(item, None, str(item))]
        else:
            labels = item / "labels.csv"
            if not labels.is_file():
                raise ValueError(f"{item}: neither a video file nor a raw dataset folder (labels.csv and its videos)")
            table = pd.read_csv(labels, dtype=str, keep_default_na=False, encoding="utf-8-sig")
            if "path" not in table.columns:
                raise ValueError(f"{labels}: no `path` column (columns: {', '.join(table.columns)})")
            known = table["label"] if "label" in table.columns else [None] * len(table)
            rows = []
            for i, (path, label) in enumerate(zip(table["path"], known, strict=True)):
                where = f"{labels} row {i + 2}"
                _, reason = _inside(item, path)  # preprocess's rule: a symlink may point anywhere (DVC's cache)
                if reason:
                    raise ValueError(f"{where}: path {path!r}: {reason}")
                rows.append((item / path, label or None, where))
        for path, label, where in rows:
            path = Path(os.path.normpath(path))  # the name the answers go under: videos/x and ./videos/x are one
            if path in seen:
                raise ValueError(f"{where}: {path} is listed twice (first: {seen[path]})")
            seen[path] = where
            videos.append((path, label))
    return videos


def infer_videos(client: Any, videos: list[tuple[Path, str | None]], frames_per_request: int = 256,
                 progress: bool = False) -> tuple[pd.DataFrame, dict[str, str]]:
    """One row per frame of every video the endpoint answered (video, frame, label, blank, one ``p_<class>``
    column per class, crop, model_version, and ``expected`` where a label is known), and the reason of each video
    it did not (an undecodable file, a 4xx naming the problem, a timeout). Once the endpoint cannot be reached any
    more, the videos left are not sent (each would fail the same way) and are listed as not sent."""
    import requests
    from tqdm import tqdm

    from sonossl.serve.client import EndpointError

    parts, failed = [], {}
    for i, (path, expected) in enumerate(tqdm(videos, desc="infer", unit="video", disable=not progress)):
        try:
            out = client.infer_long_video(path, frames_per_request=frames_per_request)
        except requests.ConnectionError as e:  # the endpoint is gone: the videos left are not sent, the answers kept
            lost = f"not sent: the endpoint could not be reached any more ({type(e).__name__})"
            failed.update({str(p): lost for p, _ in videos[i:]})
            break
        except (EndpointError, ValueError, RuntimeError, OSError) as e:  # OSError: a timeout, a missing file
            reason = str(e).removeprefix(f"{path}: ") or type(e).__name__  # VideoError names the path
            if isinstance(e, EndpointError) and e.status == 400 and "too many frames" in reason:
                reason = (f"the server takes fewer than {frames_per_request} frames per request: give "
                          f"--frames-per-request at most its --max-frames ({reason})")
            failed[str(path)] = reason
            continue
        n = len(out["label"])
        frame = pd.DataFrame({"video": str(path), "frame": range(n), "label": out["label"].astype(str),
                              "blank": out["blank"].astype(bool)})
        for j, name in enumerate(out["classes"]):
            frame[f"p_{name}"] = out["probs"][:, j].round(6)
        frame["crop"], frame["model_version"] = out["crop"], out["model_version"]
        if expected is not None:
            frame["expected"] = expected
        parts.append(frame)
    return (pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()), failed


def per_video(frames: pd.DataFrame) -> pd.DataFrame:
    """One row per video: its frames, blank frames, the label of most of its other frames and their share (blank
    frames are not judged: training leaves them out), and ``expected`` where known."""
    rows = []
    for video, group in frames.groupby("video", sort=False):
        judged = group[~group["blank"]]
        counts = judged["label"].value_counts()
        row = {"video": video, "frames": len(group), "blank": int(group["blank"].sum()),
               "label": counts.index[0] if len(counts) else "", "share": round(counts.iloc[0] / len(judged), 3)
               if len(counts) else 0.0}
        if "expected" in group.columns:
            row["expected"] = group["expected"].iloc[0]
        rows.append(row)
    return pd.DataFrame(rows)
