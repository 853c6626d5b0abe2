"""Where the data files shipped with the package lie: Avro schemas and Triton model templates.

The source tree keeps them at the top level, `avro/` and `triton_models/`. A wheel carries the
same folders inside the package, as `orchestrator/_data/avro` and `orchestrator/_data/triton_models`
(`[tool.setuptools.package-dir]` in pyproject.toml). A checkout or an editable install imports
`orchestrator` from the source tree, which has no `_data/`: there the top-level folders are used.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _shipped(name: str) -> Path:
    installed = _PACKAGE / "_data" / name
    if installed.is_dir():
        return installed
    checkout = _PACKAGE.parent
    # only beside a source tree: in site-packages, a folder of that name is another package
    if (checkout / "pyproject.toml").is_file() and (checkout / name).is_dir():
        return checkout / name
    raise FileNotFoundError(
        f"{name}/ is neither in the installed package ({installed}) "
        f"nor beside the source tree ({checkout})"
    )


def avro_dir() -> Path:
    """The folder of Avro schemas (``*.avsc``) and their permanent ids (``schema-ids.json``)."""
    return _shipped("avro")


def triton_models_dir() -> Path:
    """The folder of Triton Python-backend model templates (``<kind>/model.py``)."""
    return _shipped("triton_models")
