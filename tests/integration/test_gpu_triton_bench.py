"""bench/gpu_triton.py (issue 9) on the CPU: the same script that runs on a GPU, with tiny
models, the generator's torch stage models (fp32, KIND_CPU) served by the real tritonserver, the
real executor and StepBatcher over gRPC. One 2-step request per mode at concurrency 1.

No timing assertions: the figures have to exist and be what the setup implies (rows per UNet
execution, bytes per call), and the served image has to equal the in-process fp32 run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
#: the script's tiny UNet at its default size: latents 4x8x8; CLIP 77 tokens x 32
SAMPLE, TEXT = 4 * 8 * 8, 77 * 32


# minutes on 2 cores (torch starting in each Python stub): `make test-device-scripts`, in CI
@pytest.mark.device_script
def test_the_gpu_bench_runs_on_the_cpu_and_reports_what_it_measured(
    tiny_models: Path, tmp_path: Path
) -> None:
    out = tmp_path / "gpu_triton.json"
    command = [
        sys.executable,
        str(ROOT / "bench" / "gpu_triton.py"),
        "--tokenizer",
        str(tiny_models / "diffusers" / "tokenizer"),
        "--device",
        "cpu",
        "--steps",
        "2",
        "--concurrency",
        "1",
        "--requests",
        "1",
        "--warmup",
        "0",
        "--modes",
        "naive,step",
        "--parity",
        "1",
        "--work-dir",
        str(tmp_path / "work"),
        "--json",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["environment"]["tritonserver"] == "2.51.0"
    rows = {r["mode"]: r for r in payload["results"]}
    assert set(rows) == {"naive", "step"}
    for mode, row in rows.items():
        assert row["failed"] == 0 and row["requests"] == 1, mode
        assert row["throughput"] > 0
        # one guided job: every UNet call is 2 rows, executed alone
        assert row["triton"]["unet"]["rows_per_execution"] == 2.0, mode
        assert row["triton"]["unet"]["execution_count"] == 2, mode  # 2 steps
        assert set(row["stage_p95_ms"]) == {"encode_prompt", "unet", "vae_decoder", "total"}
        assert row["stage_p95_ms"]["unet"] < row["stage_p95_ms"]["total"]
        # fp32 on the wire: 2 rows of sample + timestep + text in, 2 rows of noise out
        wire = (2 * (4 * SAMPLE + 4 + 4 * TEXT) + 2 * 4 * SAMPLE) / 1e6
        assert row["wire"]["unet"]["mb_per_call"] == pytest.approx(wire)
        assert row["wire"]["unet"]["calls"] == 2
    # the served image equals the same pipeline run in process (fp32 both)
    [parity] = payload["parity"]
    assert parity["max_abs_diff_255"] <= 1
    assert parity["served_std"] > 1.0  # an image with content, not a constant
    assert payload["server_exit"] is not None


def test_the_stubs_venv_puts_the_stub_path_first_then_pythonpath_then_our_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Python-backend stubs ignore PYTHONPATH and read the venv first on PATH: the script's
    own venv must give them `--stub-path` before anything else (numpy 1.26 over the machine's
    numpy 2), then the carried wheels (PYTHONPATH), then this interpreter's packages."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gpu_triton_bench", ROOT / "bench" / "gpu_triton.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    first, carried = tmp_path / "stubsite", tmp_path / "carried"
    first.mkdir()
    carried.mkdir()
    # optional packages as a GPU machine may have them: one built against another numpy fails
    # to import (hidden from the stubs), one fails on a missing dependency of its own (hidden
    # too), one imports (kept)
    (carried / "sklearn").mkdir()
    (carried / "sklearn" / "__init__.py").write_text("raise ImportError('built for numpy 2')\n")
    (carried / "cv2.py").write_text("import numpy_2_only_extension\n")
    (carried / "tiktoken.py").write_text("VALUE = 1\n")
    monkeypatch.setenv("PYTHONPATH", str(carried))
    env = module.stub_environment(tmp_path / "work", str(first))
    python = Path(env["VIRTUAL_ENV"]) / "bin" / "python3"
    assert env["PATH"].split(os.pathsep)[0] == str(python.parent)
    shown = subprocess.run(
        [str(python), "-c", "import sys, json; print(json.dumps(sys.path))"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": env["PATH"]},  # no PYTHONPATH: the stubs do not read it
    )
    path = json.loads(shown.stdout)
    assert path.index(str(first)) < path.index(str(carried))
    import numpy

    ours = str(Path(numpy.__file__).resolve().parents[1])
    assert path.index(str(carried)) < path.index(ours)
    seen = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u; print([u.find_spec(n) is None "
            "for n in ('sklearn', 'cv2', 'tiktoken')])",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": env["PATH"]},
    )
    assert seen.stdout.strip() == "[True, True, False]"
