"""`orchestrator bench --architectures` end to end at a tiny size: the table and the JSON carry
every figure, positive, so the code path cannot rot. No timing assertions.

One point of the hybrid: `orchestrator serve` as a child process of the bench, driven over
Kafka, per-stage percentiles from its answers, the broker's records read back. The bench uses
the session's tritonserver and broker (`--triton`, `--bootstrap-servers`) to stay short; the
pure-Triton figures' arithmetic is tests/unit/test_bench_architectures.py."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from orchestrator.bench import main

pytestmark = pytest.mark.integration


def test_hybrid_point_has_every_figure(
    triton: Any, kafka: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "arch.json"
    code = main(
        [
            "--architectures=hybrid",
            f"--triton={triton.grpc_url},{triton.http_url}",
            f"--bootstrap-servers={kafka.bootstrap_servers}",
            "--workload=uniform",
            "--concurrency=1",
            "--requests=2",
            "--steps=2",
            "--warmup=1",
            f"--out-dir={tmp_path / 'bench'}",
            f"--json={out}",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    for column in ("img/s", "p95", "prompt", "sampling", "decoding", "hops", "KB/req", "PISDT"):
        assert column in text
    assert "load average before" in text
    data = json.loads(out.read_text())
    [r] = data["results"]
    assert (r["architecture"], r["workload"], r["concurrency"]) == ("hybrid", "uniform", 1)
    assert (r["requests"], r["failed"], r["as_txt2img"]) == (2, 0, 0)
    for key in ("throughput", "p50_ms", "p95_ms", "p99_ms"):
        assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
    assert r["total_target"] in ("met", "missed")
    # one request record and one answer per request, read back from the broker
    assert r["kafka_hops"] == 2.0
    topics = r["kafka_by_topic"]
    assert topics["requests"]["records"] == 1.0 and topics["responses"]["records"] == 1.0
    assert r["kafka_bytes_per_request"] > topics["responses"]["bytes"] > 0
    for stage in ("prompt", "sampling", "decoding"):
        figure = r["stages"][stage]
        assert figure["source"] == "answers" and figure["samples"] == 2, (stage, figure)
        assert 0 < figure["p50_ms"] <= figure["p95_ms"], (stage, figure)
        assert figure["verdict"] in ("met", "missed")
    assert r["stages"]["image"]["samples"] == 0  # uniform: no img2img
    assert r["stages"]["image"]["verdict"] == "n/a"
    # nothing left running: the serve child is stopped with the bench
    log_dirs = list((tmp_path / "bench").glob("architectures-*/hybrid-*"))
    assert log_dirs and (log_dirs[0] / "serve-all.log").exists()
