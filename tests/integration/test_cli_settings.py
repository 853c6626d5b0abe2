"""The CLI takes its logging settings from Settings: `--env-file` and ORCHESTRATOR_* variables.

`orchestrator serve` runs as a child process against a Triton address where nothing listens, so
it logs (a warning per attempt to reach Triton) without needing any server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.adapters.child_process import free_port, spawn, stop_process_group

pytestmark = pytest.mark.integration


def serve_log_lines(tmp_path: Path, env_file_lines: list[str], env: dict[str, str]) -> list[str]:
    """Start `orchestrator serve --env-file F`, return its stderr lines up to and including
    the first warning about Triton, then stop it."""
    env_file = tmp_path / "orchestrator.env"
    env_file.write_text(
        "\n".join(
            [
                f"ORCHESTRATOR_TRITON_URL=127.0.0.1:{free_port()}",
                "ORCHESTRATOR_HTTP_HOST=127.0.0.1",
                "ORCHESTRATOR_HTTP_PORT=0",
                "ORCHESTRATOR_TRACING=false",
                *env_file_lines,
            ]
        )
        + "\n"
    )
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    child_env.update(env)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        # spawn: the child dies with this process, even when it is killed hard
        process = spawn(
            [sys.executable, "-m", "orchestrator", "serve", "--env-file", str(env_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=child_env,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            lines = log_path.read_text(errors="replace").splitlines()
            for index, line in enumerate(lines):
                if "waiting for Triton" in line:
                    return lines[: index + 1]
            code = process.poll()
            assert code is None, f"orchestrator serve exited with {code}:\n" + "\n".join(lines)
            assert time.monotonic() < deadline, "no warning in 90 s:\n" + "\n".join(lines)
            time.sleep(0.1)
    finally:
        stop_process_group(process, timeout=30)


@pytest.mark.parametrize(
    ("env_file_lines", "env"),
    [
        (["ORCHESTRATOR_LOG_FORMAT=json", "ORCHESTRATOR_LOG_LEVEL=WARNING"], {}),
        ([], {"ORCHESTRATOR_LOG_FORMAT": "json"}),
    ],
    ids=["env-file", "environment"],
)
def test_serve_logs_json_lines_when_the_settings_say_so(
    tmp_path: Path, env_file_lines: list[str], env: dict[str, str]
) -> None:
    lines = [line for line in serve_log_lines(tmp_path, env_file_lines, env) if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON log line: {line!r}\nall lines:\n" + "\n".join(lines))
    warning = records[-1]
    assert warning["level"] == "WARNING"
    assert warning["logger"] == "orchestrator.service"
    assert warning["message"].startswith("waiting for Triton at 127.0.0.1:")
    assert warning["ts"].endswith("Z")

