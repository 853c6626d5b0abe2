"""bench/priority.py (issue 10) with the smallest settings against the real broker, the real
tritonserver (tiny preset) and the real service: every phase runs, every request is answered
and the report says so. No timing assertions: the figures only have to exist."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench" / "priority.py"


async def test_priority_bench_smoke(
    kafka: Any, triton: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("priority_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        args = module.build_parser().parse_args(
            [
                *("--active", "2", "--steps", "3", "--idle", "2"),
                *("--capacity-requests", "4", "--overload-s", "1.5", "--factor", "2"),
                *("--high-every", "3"),
            ]
        )
        code = await module.run(kafka, triton, args)
    finally:
        sys.modules.pop(spec.name, None)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "every low completed: yes" in out, out
    for line in ("idle high: n=2", "with priority:", "without priority (all normal):"):
        assert line in out, out
    assert "0 failed" in out and "mean wait for a slot in the service: high" in out, out
