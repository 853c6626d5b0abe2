"""The Locust load test, headless for 20 s with 2 users, against the real service in-process
(the Kafka user), and its HTTP users against a real `orchestrator gateway` process beside it.

Locust runs in a child process (importing it monkey-patches the interpreter with gevent, which
must not happen to the pytest process); the service runs on this test's event loop against real
Tansu and tritonserver, on topics of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from orchestrator.adapters.child_process import free_port, spawn, stop_process_group
from orchestrator.adapters.kafka_broker import create_topics
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


GATEWAY_RUN_TIME_S = 15
GATEWAY_KEY = "loadtest-key-1"


async def _gateway_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    async with aiohttp.ClientSession() as http:
        while True:
            assert process.poll() is None, log.read_text(errors="replace")[-4000:]
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{url}/readyz") as r:
                    if r.status == 200:
                        return
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
            await asyncio.sleep(0.1)


async def test_locust_gateway_users_headless(kafka: Any, triton: Any, tmp_path: Path) -> None:
    """Both HTTP users (sync, and jobs + events) against a real gateway process for 15 s: every
    job succeeded and each user's end-to-end latency is in Locust's stats and the summary."""
    settings = make_settings(kafka, triton, http_port=0, tracing=False)
    registry = f"gwjobs-{uuid.uuid4().hex[:8]}"
    await create_topics(settings.bootstrap_servers, [registry], partitions=1)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service_env = {
        "ORCHESTRATOR_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "ORCHESTRATOR_REQUEST_TOPIC": settings.request_topic,
        "ORCHESTRATOR_RESPONSE_TOPIC": settings.response_topic,
        "ORCHESTRATOR_DLQ_TOPIC": settings.dlq_topic,
        "ORCHESTRATOR_PROGRESS_TOPIC": settings.progress_topic,
        "ORCHESTRATOR_CONTROL_TOPIC": settings.control_topic,
        "ORCHESTRATOR_OUTPUT_DIR": str(settings.output_dir),
        "ORCHESTRATOR_TRACING": "false",
    }
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    gateway_env = {
        **base_env,
        **service_env,
        "ORCHESTRATOR_GATEWAY_REGISTRY_TOPIC": registry,
        "ORCHESTRATOR_GATEWAY_DEV_KEY": GATEWAY_KEY,
        "ORCHESTRATOR_GATEWAY_RATE_PER_S": "1000",
        "ORCHESTRATOR_GATEWAY_BURST": "1000",
    }
    summary_path = tmp_path / "summary.json"
    locust_env = {
        **base_env,
        "LOADTEST_GATEWAY_URL": url,
        "LOADTEST_GATEWAY_KEY": GATEWAY_KEY,
        "LOADTEST_STEPS": "4",
        "LOADTEST_TIMEOUT_S": "60",
        "LOADTEST_SUMMARY": str(summary_path),
    }
    gateway_log = tmp_path / "gateway.log"
    async with running_service(settings):
        with gateway_log.open("ab") as out:
            gateway = spawn(
                [sys.executable, "-m", "orchestrator", "gateway", "--port", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=gateway_env,
            )
        proc: asyncio.subprocess.Process | None = None
        try:
            await _gateway_ready(url, gateway, gateway_log)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "locust",
                "-f",
                "loadtest/locustfile.py",
                "GatewaySyncUser",
                "GatewayEventsUser",
                "--headless",
                "--users",
                "2",
                "--spawn-rate",
                "2",
                "--run-time",
                f"{GATEWAY_RUN_TIME_S}s",
                "--stop-timeout",
                "10",
                "--csv",
                str(tmp_path / "gw"),
                "--only-summary",
                cwd=ROOT,
                env=locust_env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out_bytes, _ = await asyncio.wait_for(proc.communicate(), GATEWAY_RUN_TIME_S + 90)
        finally:
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
            stop_process_group(gateway, timeout=10)
    log = out_bytes.decode(errors="replace")
    assert proc.returncode == 0, log[-4000:]

    summary = json.loads(summary_path.read_text())
    assert summary["sent"] == 0, summary  # the Kafka user did not run
    users = summary["gateway"]
    assert set(users) == {"GatewaySyncUser", "GatewayEventsUser"}, summary
    for name, tally in users.items():
        assert tally["succeeded"] >= 2, (name, tally)
        assert tally["failed"] == {}, (name, tally)
        latency = tally["latency_s"]
        assert latency["count"] == tally["succeeded"]
        # end to end: several model calls behind each job, not just an HTTP round trip
        assert 0 < latency["p50"] <= latency["p95"] <= latency["max"] < 60, (name, latency)

    with (tmp_path / "gw_stats.csv").open() as fh:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(fh)}
    for name in ("gateway sync 4 steps", "gateway events 4 steps"):
        row = rows[("e2e", name)]
        assert int(row["Request Count"]) > 0, rows.keys()
        assert int(row["Failure Count"]) == 0, row
        assert float(row["Median Response Time"]) > 0, row
    # the HTTP calls themselves are in the stats too
    assert int(rows[("POST", "/v1/images/generations")]["Request Count"]) > 0
    assert int(rows[("POST", "/v1/jobs")]["Request Count"]) > 0
    assert int(rows[("GET", "/v1/jobs/[id]/events")]["Request Count"]) > 0
    # the sync end-to-end time is the POST's own time: both columns agree
    sync_post = float(rows[("POST", "/v1/images/generations")]["Median Response Time"])
    sync_e2e = float(rows[("e2e", "gateway sync 4 steps")]["Median Response Time"])
    assert abs(sync_post - sync_e2e) <= max(50.0, 0.25 * sync_e2e), (sync_post, sync_e2e)
