"""`make demo`: start the embedded stack, generate one image through Kafka, print its path, stop.

`orchestrator dev` runs as a child that dies with this process (and its servers with it), so an
interrupted or killed demo leaves nothing holding the stack's ports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from orchestrator.adapters.child_process import spawn, stop_process_group

PROMPT = "a lighthouse on a cliff at sunset, oil painting"


def main() -> int:
    out = Path(os.environ.get("DEMO_OUT", "out/demo.png")).resolve()
    started = time.monotonic()
    dev = spawn(
        [sys.executable, "-m", "orchestrator", "--log-level", "WARNING", "dev"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    ready = threading.Event()
    lines: list[str] = []

    def pump() -> None:
        assert dev.stdout is not None
        for raw in dev.stdout:
            line = raw.decode("utf-8", "replace")
            lines.append(line)
            print(f"  [dev] {line}", end="", flush=True)
            if line.startswith("ready"):
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        while not ready.wait(1.0):
            if dev.poll() is not None:
                print("error: `orchestrator dev` exited before it was ready", file=sys.stderr)
                return 1
            if time.monotonic() - started > 900:
                print("error: the stack was not ready after 15 minutes", file=sys.stderr)
                return 1
        print(f"stack ready after {time.monotonic() - started:.1f} s; submitting one prompt")
        for line in lines:
            if line.startswith("playground: "):
                # the HTTP gateway's page; `orchestrator dev` keeps it up after the demo
                print(f"playground (while `orchestrator dev` runs): {line[12:].strip()}")
        code = subprocess.call(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "--log-level",
                "WARNING",
                "submit",
                "--prompt",
                PROMPT,
                "--seed",
                "42",
                "--steps",
                "20",
                "--out",
                str(out),
            ]
        )
        if code != 0:
            print("error: the request failed", file=sys.stderr)
            return code
        print(f"\nimage written to {out} ({time.monotonic() - started:.1f} s in all)")
        return 0
    finally:
        # SIGINT: `dev` stops the service and its servers in order; SIGKILL after a minute
        stop_process_group(dev, timeout=60, sig=signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
