"""A plain (non-editable) wheel install works without the source tree.

The wheel is built offline from a copy of what the Dockerfile copies, installed into a fresh
virtual environment without its dependencies, and run from that environment's own
`bin/orchestrator`. The fresh environment sees this environment's dependencies through a path line
in a `.pth` file: Python adds the folder to `sys.path` but does not process the `.pth` files inside
it, so the editable install's finder stays out (checked below).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.models.repository import BLS_MODEL, ENSEMBLE, MODEL_NAMES, ONNX_STAGES

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
#: what the Dockerfile's build stage copies; the wheel is built from these alone
SOURCES = ("pyproject.toml", "README.md", "orchestrator", "avro", "triton_models")
DATA = ("avro", "triton_models")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")


@dataclass(frozen=True)
class Installed:
    venv: Path
    python: Path
    work: Path


def run(cmd: list[str | Path], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    # no PYTHONPATH and a cwd outside the checkout: nothing may lead back to the source tree
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def tracked_files(folder: Path) -> set[Path]:
    return {
        p.relative_to(folder)
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=IGNORED)
        else:
            shutil.copyfile(ROOT / name, src / name)
    dist = tmp / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", dist, src],
        cwd=tmp, timeout=180,
    )  # fmt: skip
    (wheel,) = dist.glob("orchestrator-*.whl")

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp, timeout=120)
    python = venv / "bin" / "python"
    run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
         "--no-index", wheel],
        cwd=tmp, timeout=180,
    )  # fmt: skip
    # Only after the install: pip must not see (and never touch) this environment's packages.
    site = Path(
        run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp, 60
        ).stdout.strip()
    )
    assert site.is_relative_to(venv)
    (site / "zz_dev_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    work = tmp / "work"
    work.mkdir()
    return Installed(venv=venv, python=python, work=work)


def test_the_installed_package_imports_from_the_fresh_environment(installed: Installed) -> None:
    probe = (
        "import json, sys, orchestrator, orchestrator.adapters.avro\n"
        "from orchestrator import resources\n"
        "print(json.dumps({'file': orchestrator.__file__,\n"
        "  'avro': str(resources.avro_dir()), 'templates': str(resources.triton_models_dir()),\n"
        "  'editable': [m for m in sys.modules if m.startswith('__editable__')],\n"
        "  'finders': [repr(f) for f in sys.meta_path], 'path': sys.path}))"
    )
    facts = json.loads(run([installed.python, "-c", probe], installed.work, 120).stdout)
    venv = installed.venv.resolve()
    assert Path(facts["file"]).resolve().is_relative_to(venv), facts["file"]
    assert not facts["editable"] and not any("editable" in f.lower() for f in facts["finders"])
    # the dependencies come from the dev environment, added as a plain path entry
    assert sysconfig.get_path("purelib") in facts["path"]
    assert str(ROOT) not in facts["path"]
    for name, key in (("avro", "avro"), ("triton_models", "templates")):
        data = Path(facts[key])
        assert data.resolve().is_relative_to(venv), data
        assert data == Path(facts["file"]).parent / "_data" / name
        # every file of the source folder is shipped, byte for byte
        assert tracked_files(data) == tracked_files(ROOT / name)
        for rel in tracked_files(ROOT / name):
            assert (data / rel).read_bytes() == (ROOT / name / rel).read_bytes(), rel


def test_the_wheel_has_every_module(installed: Installed) -> None:
    """A subpackage missing from pyproject.toml's explicit package list fails here."""
    package = next(installed.venv.glob("lib/python*/site-packages/orchestrator"))
    source = {p for p in tracked_files(ROOT / "orchestrator") if p.suffix in {".py", ".typed"}}
    shipped = {p for p in tracked_files(package) if p.suffix in {".py", ".typed"}}
    assert source - shipped == set(), f"missing from the wheel: {sorted(source - shipped)}"


def test_models_build_from_the_installed_command(installed: Installed) -> None:
    out = installed.work / "models"
    exe = installed.venv / "bin" / "orchestrator"
    run([exe, "models", "build", "--preset", "tiny", "--out", out], installed.work, 300)
    repo = out / "repository"
    assert {p.name for p in repo.iterdir() if p.is_dir()} == set(MODEL_NAMES)
    templates = ROOT / "triton_models"
    for name in MODEL_NAMES:
        assert (repo / name / "config.pbtxt").is_file(), name
        assert (repo / name / "1").is_dir(), name
    for stage in ONNX_STAGES:
        assert (repo / stage / "1" / "model.onnx").stat().st_size > 0, stage
        model = (repo / stage / "1" / "model.py").read_bytes()
        assert model == (templates / "onnx_stage" / "model.py").read_bytes(), stage
    tokenizer = repo / "tokenizer" / "1"
    assert (tokenizer / "model.py").read_bytes() == (templates / "tokenizer/model.py").read_bytes()
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (tokenizer / "tokenizer").iterdir()}
    bls = repo / BLS_MODEL / "1" / "model.py"
    assert bls.read_bytes() == (templates / BLS_MODEL / "model.py").read_bytes()
    assert not list((repo / ENSEMBLE / "1").iterdir())
    # the BLS model finds `orchestrator` in the fresh environment, not in the checkout
    config = (repo / BLS_MODEL / "config.pbtxt").read_text()
    site = next(installed.venv.glob("lib/python*/site-packages")).resolve()
    assert f'key: "orchestrator_src" value: {{ string_value: "{site}" }}' in config, config


def test_serve_help_from_the_installed_command(installed: Installed) -> None:
    exe = installed.venv / "bin" / "orchestrator"
    proc = run([exe, "serve", "--help"], installed.work, 120)
    assert proc.stdout.startswith("usage: orchestrator serve")
    assert "--env-file" in proc.stdout
