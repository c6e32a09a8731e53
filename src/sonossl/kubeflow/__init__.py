"""The Kubeflow components and pipelines: ``sonossl.kubeflow.components`` and ``sonossl.kubeflow.pipelines``.

Their code lives at the top of the repository (``components/``, ``pipelines/``, where ``kfp dsl compile --py
pipelines/training.py`` finds it); an installed sonossl holds it here (pyproject.toml's ``package-dir``), so that
installing sonossl adds no top-level package with a name as common as ``components`` or ``pipelines``. From a
checkout (``PYTHONPATH=src``, or an editable install), this package's path reaches the folders of the checkout
whose ``src`` holds it (with an editable install and no ``PYTHONPATH``, the checkout it was installed from).

    from sonossl.kubeflow.components import gpu_step
    from sonossl.kubeflow.pipelines.training import training
"""

from pathlib import Path

_here = Path(__file__).resolve().parent
_checkout = _here.parents[2]  # src/sonossl/kubeflow -> the repository
if not (_here / "components").is_dir() and (_checkout / "components" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 (a package's __path__)
