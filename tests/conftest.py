"""Session fixtures: real models built once, real servers started once, failing loudly."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Keep the many small torch/ONNX Runtime thread pools from fighting over 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset, built once per session: DIR/diffusers, DIR/onnx, DIR/repository."""
    from orchestrator.models.build import build_models

    out = tmp_path_factory.mktemp("tiny")
    build_models(preset="tiny", source=None, out=out, target="cpu")
    return out


@pytest.fixture(scope="session")
def triton(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real tritonserver serving the tiny repository; the session fails if it cannot start."""
    from orchestrator.adapters.triton_server import TritonServer

    work = tmp_path_factory.mktemp("tritonserver")
    with TritonServer(tiny_models / "repository", work_dir=work, startup_timeout=180) as server:
        yield server


@pytest.fixture(scope="session")
def kafka() -> Iterator[object]:
    """A real Kafka-compatible broker (Tansu); the session fails if it cannot start."""
    from orchestrator.adapters.kafka_broker import TansuBroker

    with TansuBroker(0) as broker:
        yield broker
