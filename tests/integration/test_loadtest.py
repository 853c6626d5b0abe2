"""The Locust load test, headless for 20 s with 2 users, against the real service in-process.

Locust runs in a child process (importing it monkey-patches the interpreter with gevent, which
must not happen to the pytest process); the service runs on this test's event loop against real
Tansu and tritonserver, on topics of its own.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.service_harness import make_settings, running_service

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RUN_TIME_S = 20


async def test_locust_headless_end_to_end(kafka: Any, triton: Any, tmp_path: Path) -> None:
    settings = make_settings(kafka, triton, http_port=0, tracing=False)
    summary_path = tmp_path / "summary.json"
    env = {
        **os.environ,
        "ORCHESTRATOR_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "ORCHESTRATOR_REQUEST_TOPIC": settings.request_topic,
        "ORCHESTRATOR_RESPONSE_TOPIC": settings.response_topic,
        "ORCHESTRATOR_DLQ_TOPIC": settings.dlq_topic,
        "ORCHESTRATOR_GROUP_ID": settings.group_id,
        "LOADTEST_STEPS": "4",
        "LOADTEST_TIMEOUT_S": "60",
        "LOADTEST_SUMMARY": str(summary_path),
    }
    async with running_service(settings):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "locust",
            "-f",
            "loadtest/locustfile.py",
            "--headless",
            "--users",
            "2",
            "--spawn-rate",
            "2",
            "--run-time",
            f"{RUN_TIME_S}s",
            "--stop-timeout",
            "10",
            "--csv",
            str(tmp_path / "lt"),
            "--only-summary",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), RUN_TIME_S + 90)
    log = out.decode(errors="replace")
    assert proc.returncode == 0, log[-4000:]
    assert "Task was destroyed but it is pending" not in log, log[-4000:]

    summary = json.loads(summary_path.read_text())
    assert summary["answered"] >= 4, summary
    assert summary["failed"] == {} and summary["timeouts"] == 0, summary
    assert summary["duplicates"] == 0, summary
    latency = summary["latency_s"]
    assert latency["count"] == summary["answered"]
    # end to end: several model calls per request, far above a produce acknowledgement
    assert 0 < latency["p50"] <= latency["p95"] <= latency["max"] < 60

    with (tmp_path / "lt_stats.csv").open() as fh:
        rows = {row["Name"]: row for row in csv.DictReader(fh)}
    row = rows["generate 4 steps"]
    # the CSV is written when the run stops; answers of requests still in flight then come later
    assert 0 < int(row["Request Count"]) <= summary["answered"]
    assert int(row["Failure Count"]) == 0
    assert float(row["Median Response Time"]) > 0
