"""`make demo`: start the embedded stack, generate one image through Kafka, print its path, stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPT = "a lighthouse on a cliff at sunset, oil painting"


def main() -> int:
    out = Path(os.environ.get("DEMO_OUT", "out/demo.png")).resolve()
    started = time.monotonic()
    dev = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--log-level", "WARNING", "dev"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    ready = threading.Event()
    lines: list[str] = []

    def pump() -> None:
        assert dev.stdout is not None
        for line in dev.stdout:
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
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGINT)
            try:
                dev.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(dev.pid, signal.SIGKILL)
                dev.wait()


if __name__ == "__main__":
    sys.exit(main())
