"""Where a pipeline run reads its raw dataset from: an S3 prefix, a DVC revision, or a local folder.

The training pipeline's ``dataset`` parameter names one raw dataset (``labels.csv`` + videos) in one of three forms:

- ``s3://bucket/prefix``: the objects under the prefix (``sonossl.storage``; credentials from the environment);
- ``dvc://<path>?repo=<git url or folder>&rev=<revision>``: the DVC-tracked folder ``<path>`` as it was at git
  revision ``rev`` (a tag, branch or commit) of the repository ``repo``, read through ``dvc.api.DVCFileSystem``
  from the repository's DVC remote or cache; ``repo`` defaults to the working directory, ``rev`` to its HEAD;
- a local folder (absolute, or relative to the working directory): used in place; this is what ``run-local`` uses.

    raw = fetch_raw_dataset("dvc://data/raw/sim?repo=https://github.com/org/sonossl.git&rev=v0.1.0", "/tmp/raw")
    raw = fetch_raw_dataset("s3://datasets/raw/sim", "/tmp/raw")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs

T = TypeVar("T")

DVC_SCHEME = "dvc://"


@dataclass(frozen=True)
class DvcLocation:
    path: str
    repo: str | None
    rev: str | None


def parse_dvc_location(location: str) -> DvcLocation:
    """Split ``dvc://<path>?repo=...&rev=...``; unknown query keys and a missing path are errors."""
    if not location.startswith(DVC_SCHEME):
        raise ValueError(f"dataset {location!r}: a DVC location starts with {DVC_SCHEME!r}")
    path, _, query = location[len(DVC_SCHEME):].partition("?")
    fields = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    unknown = sorted(set(fields) - {"repo", "rev"})
    if unknown or not path.strip("/"):
        extra = f"; unknown key(s) {unknown}" if unknown else ""
        raise ValueError(f"dataset {location!r}: expected dvc://<path in the repository>?repo=<git url or folder>"
                         f"&rev=<revision> (repo and rev optional){extra}")
    one = lambda k: fields[k][-1] if k in fields and fields[k][-1] else None  # noqa: E731
    return DvcLocation(path=path.strip("/"), repo=one("repo"), rev=one("rev"))


def fetch_raw_dataset(location: str, dest: str | Path) -> Path:
    """Make the raw dataset at ``location`` available locally and return its folder (``dest`` unless local)."""
    location = location.strip()
    dest = Path(dest)
    if not location:
        raise ValueError("dataset: empty location; give an s3:// prefix, a dvc:// location or a local folder")
    if location.startswith("s3://"):
        from sonossl import storage

        return Path(storage.download(location, dest))
    if location.startswith(DVC_SCHEME):
        return _fetch_dvc(parse_dvc_location(location), dest)
    if "://" in location:
        raise ValueError(f"dataset {location!r}: unsupported scheme; give an s3:// prefix, a dvc:// location "
                         "or a local folder")
    path = Path(location).expanduser().resolve()
    if not (path / "labels.csv").is_file():
        raise FileNotFoundError(f"dataset {location!r}: {path / 'labels.csv'} not found; a raw dataset folder holds "
                                "labels.csv and the videos it lists")
    return path


def check_raw_dataset(location: str) -> None:
    """Fail now, naming it, when an ``s3://`` or ``dvc://`` location holds no raw dataset (no ``labels.csv``): a
    check before a pipeline starts, where the first task would fail only after its retries."""
    if location.startswith("s3://"):
        from sonossl.storage import holds

        if not holds(location.rstrip("/") + "/labels.csv"):
            raise FileNotFoundError(f"dataset {location}: no labels.csv there (a raw dataset holds labels.csv and the "
                                    "videos it lists)")
    elif location.startswith(DVC_SCHEME):
        loc = parse_dvc_location(location)
        if not _with_dvc(loc, lambda fs: fs.isfile(f"{loc.path}/labels.csv")):
            raise FileNotFoundError(f"dataset {location}: no {loc.path}/labels.csv in {loc.repo or Path.cwd()} at "
                                    f"revision {loc.rev or 'HEAD'} (a raw dataset folder, tracked by DVC)")


def _with_dvc(loc: DvcLocation, action: Callable[[Any], T]) -> T:
    """``action`` on the repository's ``DVCFileSystem`` at the location's revision; dvc's many error types (SCM,
    remote, revision) become one clear ValueError; a FileNotFoundError of ``action``'s own passes as it is."""
    from dvc.api import DVCFileSystem

    repo = loc.repo or str(Path.cwd())
    try:
        return action(DVCFileSystem(repo, rev=loc.rev))
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"dataset dvc://{loc.path} (repo {repo}, rev {loc.rev or 'HEAD'}): {type(e).__name__}: "
                         f"{e}") from e


def _fetch_dvc(loc: DvcLocation, dest: Path) -> Path:
    def get(fs: Any) -> None:
        if not fs.isdir(loc.path):
            raise FileNotFoundError(f"dataset dvc://{loc.path}: no such folder in {loc.repo or Path.cwd()} at "
                                    f"revision {loc.rev or 'HEAD'}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs.get(loc.path, str(dest), recursive=True)

    _with_dvc(loc, get)
    if not (dest / "labels.csv").is_file():
        raise FileNotFoundError(f"dataset dvc://{loc.path}: no labels.csv in it; a raw dataset folder holds "
                                "labels.csv and the videos it lists")
    return dest
