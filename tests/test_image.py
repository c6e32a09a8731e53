"""The Dockerfile, checked offline (no Docker engine here): variants, pins, user, entry points, build context.

The image itself is built elsewhere (`docker build --build-arg VARIANT=cpu|cuda`, see the README); these tests keep
the Dockerfile in step with pyproject.toml, the installed torch build and the k8s/ manifests.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from pathlib import Path

from sonossl import __version__

REPO = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    lines, out, buf = (REPO / "Dockerfile").read_text().splitlines(), [], ""
    for line in lines:
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pins() -> dict[str, str]:
    deps = pyproject()["project"]["dependencies"]
    return dict(re.fullmatch(r"([A-Za-z0-9_.\[\]-]+)==(\S+)", d).groups() for d in deps)


def test_torch_pins_agree_with_pyproject_and_the_makefile():
    torch_lines = [a for i, a in instructions() if i == "RUN" and "torch==" in a]
    assert len(torch_lines) == 1
    found = dict(re.findall(r"(torch|torchvision)==(\S+)", torch_lines[0]))
    p = pins()
    assert found == {"torch": p["torch"], "torchvision": p["torchvision"]}
    assert f"torch=={p['torch']} torchvision=={p['torchvision']}" in (REPO / "Makefile").read_text()
    # torch first (from the variant's index), then the other pins (torch's own pin is then already satisfied)
    runs = [a for i, a in instructions() if i == "RUN"]
    assert runs.index(torch_lines[0]) < next(n for n, a in enumerate(runs) if "-r /tmp/requirements.txt" in a)


def test_both_variants_pick_a_base_and_a_torch_index():
    ins = instructions()
    assert ("ARG", "VARIANT=cpu") in ins
    stages = {m.group(1): n for n, (i, a) in enumerate(ins) if i == "FROM" and (m := re.search(r" AS (\S+)$", a))}
    assert {"base-cpu", "base-cuda"} <= set(stages)
    assert [a for i, a in ins if i == "FROM"][-1] == "base-${VARIANT}"
    index = {}
    for stage, start in stages.items():
        env = next(a for i, a in ins[start:] if i == "ENV" and "TORCH_INDEX_URL" in a)
        index[stage] = re.search(r"TORCH_INDEX_URL=(\S+)", env).group(1)
    assert index["base-cpu"] == "https://download.pytorch.org/whl/cpu"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d{3}", index["base-cuda"])
    # the cuda variant installs the CUDA build tested here (torch 2.14.1+cu130 -> whl/cu130); read without importing
    import importlib.util

    torch_dir = Path(importlib.util.find_spec("torch").origin).parent
    cuda = re.search(r"^cuda\b.*=\s*'([\d.]+)'", (torch_dir / "version.py").read_text(), re.M)
    if cuda:  # a CPU-only torch here says nothing about which CUDA index matches
        assert index["base-cuda"].endswith("/cu" + cuda.group(1).replace(".", ""))


def test_runs_as_a_non_root_user_that_matches_the_manifests():
    ins = instructions()
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    uid = users[-1].split(":")[0]
    assert any(i == "RUN" and f"useradd --uid {uid}" in a for i, a in ins)
    # the pods' securityContext says the same uid
    for path in (REPO / "k8s").rglob("*.yaml"):
        for m in re.finditer(r"runAsUser: (\d+)", path.read_text()):
            assert m.group(1) == uid, path


def test_version_label_and_entry_points():
    ins = instructions()
    assert ("ARG", f"SONOSSL_VERSION={__version__}") in ins and pyproject()["project"]["version"] == __version__
    labels = " ".join(a for i, a in ins if i == "LABEL")
    assert 'org.opencontainers.image.version="${SONOSSL_VERSION}"' in labels
    # `docker run IMAGE sonossl <step>` and `docker run IMAGE python -m sonossl.serve` both need no ENTRYPOINT
    assert not [a for i, a in ins if i == "ENTRYPOINT"]
    assert [a for i, a in ins if i == "CMD"][-1] == '["sonossl", "--help"]'
    assert pyproject()["project"]["scripts"]["sonossl"] == "sonossl.cli:main"
    import importlib.util

    assert importlib.util.find_spec("sonossl.cli") is not None
    assert importlib.util.find_spec("sonossl.serve.__main__") is not None, "python -m sonossl.serve: no __main__"


def test_build_context_holds_what_the_dockerfile_copies():
    """.dockerignore is an allow-list: every COPY source must be allowed, and the venv and data must not be."""
    rules = [r.strip() for r in (REPO / ".dockerignore").read_text().splitlines()
             if r.strip() and not r.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for rule in rules:
            neg, pat = rule.startswith("!"), rule.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/") or fnmatch.fnmatch(path, "*/" + pat):
                keep = neg
        return keep

    copies = [a.split()[:-1] for i, a in instructions() if i == "COPY"]
    sources = [s for c in copies for s in c if not s.startswith("--")]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        assert included(src), f"COPY {src}: excluded by .dockerignore"
    for heavy in (".venv", "data", "models", ".git", ".dvc/cache", "reports"):
        assert not included(heavy), f"{heavy} would be sent to the Docker daemon"


def test_dependencies_install_in_a_layer_that_code_changes_do_not_rebuild():
    """Only pyproject.toml and constraints.txt are copied before the dependencies are installed (a change to src,
    components, pipelines,
    params.yaml or the README reuses that layer); the package goes in afterwards without them, and `pip check`
    proves nothing is missing. The requirements command is run here on pyproject.toml: it lists every pin."""
    import shlex
    import subprocess
    import sys

    steps = instructions()
    deps = next(i for i, (ins, args) in enumerate(steps) if ins == "RUN" and "requirements.txt" in args)
    package = next(i for i, (ins, args) in enumerate(steps) if ins == "RUN" and "pip install --no-deps ." in args)
    copied = [(i, args.split()[:-1]) for i, (ins, args) in enumerate(steps) if ins == "COPY"]
    assert [src for i, srcs in copied if i < deps for src in srcs] == ["pyproject.toml", "constraints.txt"]
    after = {src for i, srcs in copied if deps < i < package for src in srcs}
    assert {"src", "components", "pipelines", "README.md"} <= after
    assert "pip check" in steps[package][1]

    words = shlex.split(steps[deps][1].split(">")[0])
    assert words[:2] == ["python", "-c"]
    out = subprocess.run([sys.executable, "-c", words[2]], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == pyproject()["project"]["dependencies"]


def _name(requirement: str) -> str:
    return re.split(r"[=<>!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-").replace(".", "-")


def test_constraints_hold_every_pin_of_pyproject_and_both_installs_use_them():
    """constraints.txt fixes the transitive packages at the versions the tests passed with; it must agree with every
    direct pin (dependencies and the dev extra), leave torch to its own install (the image's comes from the
    variant's index), and be what `make setup` and the Dockerfile install with."""
    constraints = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and name.lower() not in constraints, line
            constraints[name.lower().replace("_", "-").replace(".", "-")] = version
    project = pyproject()["project"]
    direct = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    for requirement in direct:
        name, version = _name(requirement), requirement.split("==", 1)[1].split(";")[0].strip()
        if name in ("torch", "torchvision"):
            assert name not in constraints
        else:
            assert constraints.get(name) == version, (requirement, constraints.get(name))
    assert not any(n.startswith(("nvidia-", "cuda-")) or n == "triton" for n in constraints)
    assert "-c constraints.txt -e '.[dev]'" in (REPO / "Makefile").read_text()
    assert "$(STAMP): pyproject.toml constraints.txt" in (REPO / "Makefile").read_text()
    runs = [a for i, a in instructions() if i == "RUN"]
    assert any("pip install -c constraints.txt -r /tmp/requirements.txt" in a for a in runs)


def test_the_wheel_holds_one_top_level_package_and_compiles_the_pipelines_beside_a_users_own(tmp_path):
    """What `pip install .` (the image's install) puts in site-packages: the package ``sonossl`` alone, with the
    repository's components/ and pipelines/ inside it as ``sonossl.kubeflow.*`` (top-level packages named
    ``components`` and ``pipelines`` would clash with a user's own), every module of the checkout, and the
    LICENSE. Installed so, it compiles the pipelines to the golden YAML from a folder holding a ``pipelines``
    package of the user's (built in a copy of the checkout's files, with the virtualenv's setuptools)."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for name in ("src", "components", "pipelines"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "golden"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("sonossl-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        top = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert zf.read(top).decode().split() == ["sonossl"]
        zf.extractall(tmp_path / "site")
    package = REPO / "src/sonossl"
    modules = {f"sonossl/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py")}
    modules |= {f"sonossl/kubeflow/{d}/{p.name}" for d in ("components", "pipelines") for p in (REPO / d).glob("*.py")}
    assert not modules - names, f"left out of the wheel (pyproject.toml's packages): {sorted(modules - names)}"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    user = tmp_path / "project"
    for pkg in ("components", "pipelines"):
        (user / pkg).mkdir(parents=True)
        (user / pkg / "__init__.py").write_text("raise SystemExit('imported a package of the user')\n")
    code = "from sonossl.pipeline.spec import compile_pipelines; compile_pipelines('out')"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(tmp_path / "site")}
    subprocess.run([sys.executable, "-c", code], cwd=user, env=env, check=True, timeout=300)
    for name in ("training", "monitoring", "crossval"):
        assert (user / "out" / f"{name}.yaml").read_bytes() == (REPO / "pipelines/golden" / f"{name}.yaml").read_bytes()
