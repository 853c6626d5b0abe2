"""`orchestrator bench` end to end with tiny numbers: every figure is printed and written to JSON.

No timing assertions: the figures only have to exist and be sane (positive, finite)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from orchestrator.bench import main

pytestmark = pytest.mark.integration

FIGURES = ("img/s", "p50 ms", "p95 ms", "p99 ms", "unet batch", "compute/call", "overhead/call")


def run(tmp_path: Path, name: str, *extra: str) -> dict[str, object]:
    out = tmp_path / f"{name}.json"
    code = main(
        [
            "--presets=micro",
            "--concurrency=1,2",
            "--requests=4",
            "--steps=2",
            "--warmup=2",
            f"--out-dir={tmp_path / 'bench'}",
            f"--plot-dir={tmp_path / 'plots'}",
            f"--json={out}",
            *extra,
        ]
    )
    assert code == 0
    data: dict[str, object] = json.loads(out.read_text())
    return data


def check_results(data: dict[str, object], modes: set[str], path: str) -> None:
    results = data["results"]
    assert isinstance(results, list)
    seen = {(r["mode"], r["workload"], r["concurrency"]) for r in results}
    assert seen == {(m, w, c) for m in modes for w in ("uniform", "mixed") for c in (1, 2)}
    for r in results:
        assert r["path"] == (path if r["mode"] != "bls" else "grpc")
        assert r["requests"] == 4 and r["failed"] == 0
        for key in ("throughput", "p50_ms", "p95_ms", "p99_ms", "compute_ms_per_call"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["unet_batch"] >= 1.0  # a guided job alone is 2 rows
        assert r["job_calls"] > 0 and r["triton_requests"] > 0
        assert math.isfinite(r["overhead_ms_per_call"])


def test_bench_direct_and_kafka(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    direct = run(tmp_path, "direct", "--no-kafka")
    check_results(direct, {"naive", "step", "bls"}, "direct")
    text = capsys.readouterr().out
    for figure in FIGURES:
        assert figure in text
    for ratio in (
        "step/naive throughput @2",
        "step/BLS throughput @2",
        "step/naive p50 @1",
        "step overhead ms/call @1",
        "step mixed/uniform unet batch @2",
    ):
        assert ratio in text
    assert (tmp_path / "plots" / "bench-micro.png").stat().st_size > 1000
    names = {r["name"] for r in direct["ratios"]}  # type: ignore[attr-defined]
    assert "step/naive throughput @2" in names

    kafka = run(tmp_path, "kafka", "--modes=naive,step", "--no-plot")
    check_results(kafka, {"naive", "step"}, "kafka")
    assert "step/naive p50 @1" in capsys.readouterr().out
