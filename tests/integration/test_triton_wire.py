"""Issue 14 at the Triton edge, against the real tritonserver serving echo UNets: fp16 on the wire
(fp32 in, fp32 back, equal to the fp16-rounded input), conditioning resident in system shared
memory (written once per batch composition), plain gRPC where registration is refused or the
setting is off, and a Triton restart between steps survived without an error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from orchestrator.adapters import triton_shm
from orchestrator.adapters.triton import TritonClient
from orchestrator.adapters.triton_server import TritonServer
from orchestrator.domain import StageCall
from orchestrator.models import echo

FP16 = echo.model_name("tiny", "fp16")
FP32 = echo.model_name("tiny", "fp32")
OUTPUTS = (echo.OUTPUT, "echo_encoder_hidden_states", "echo_sample")


@pytest.fixture(scope="module")
def echo_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    work = tmp_path_factory.mktemp("echo-triton")
    echo.write_repository(work / "repository", [("tiny", "fp16"), ("tiny", "fp32")])
    with TritonServer(work / "repository", work_dir=work / "run", startup_timeout=180) as server:
        yield server


def job_inputs(rng: np.random.Generator, rows: int = 2) -> dict[str, npt.NDArray[np.float32]]:
    return echo.orchestrator_inputs(echo.SHAPES["tiny"], rows, rng)


def merged(model: str, jobs: list[dict[str, npt.NDArray[np.float32]]]) -> StageCall:
    """A step's batch as the batcher builds it: members concatenated, their arrays as sources."""
    names = list(jobs[0])
    return StageCall(
        model,
        {n: np.concatenate([j[n] for j in jobs]) for n in names},
        OUTPUTS,
        {n: tuple(j[n] for j in jobs) for n in names},
    )


def rounded(arr: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    return arr.astype(np.float16).astype(np.float32)


def check(out: dict[str, npt.NDArray[Any]], call: StageCall, wire: type) -> None:
    for name, src in ((echo.OUTPUT, "sample"), ("echo_sample", "sample")):
        assert out[name].dtype == np.float32
        want = call.inputs[src].astype(wire).astype(np.float32)
        np.testing.assert_array_equal(out[name], want)
    got = out["echo_encoder_hidden_states"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(
        got, call.inputs["encoder_hidden_states"].astype(wire).astype(np.float32)
    )


@pytest.mark.parametrize("mode", ["off", "on"])
async def test_fp16_on_the_wire_comes_back_fp32_rounded(
    echo_triton: TritonServer, mode: str
) -> None:
    rng = np.random.default_rng(1)
    async with TritonClient(echo_triton.grpc_url, shared_memory=mode) as client:
        assert (await client.wire_dtypes(FP16))["sample"] == np.float16
        assert (await client.wire_dtypes(FP16))["timestep"] == np.float32
        for model, wire in ((FP16, np.float16), (FP32, np.float32)):
            call = merged(model, [job_inputs(rng), job_inputs(rng)])
            out = await client.infer(call)
            check(out, call, wire)
            # fp16 rounding really happened on the half-precision model (and only there)
            same = np.array_equal(out[echo.OUTPUT], call.inputs["sample"])
            assert same == (wire is np.float32)
        assert client.uses_shared_memory == (mode == "on")


async def test_conditioning_is_written_once_per_batch_composition(
    echo_triton: TritonServer,
) -> None:
    rng = np.random.default_rng(2)
    jobs = [job_inputs(rng) for _ in range(3)]
    async with TritonClient(echo_triton.grpc_url, shared_memory="auto") as client:
        for step in range(4):
            for j in jobs:  # each step: new latents, same conditioning arrays
                j["sample"] = rng.standard_normal(j["sample"].shape, dtype=np.float32)
            call = merged(FP16, jobs)
            check(await client.infer(call), call, np.float16)
            assert client.shm is not None
            per_batch = call.inputs["encoder_hidden_states"].size * 2
            assert client.shm.bytes_staged == per_batch, f"step {step} rewrote the conditioning"
        # a job leaves: the composition changed, the slot is rewritten once, then stays
        jobs = jobs[1:]
        for _ in range(2):
            call = merged(FP16, jobs)
            check(await client.infer(call), call, np.float16)
        assert client.shm.bytes_staged == per_batch + call.inputs["encoder_hidden_states"].size * 2


async def test_a_remote_triton_refusing_registration_gets_plain_grpc(
    echo_triton: TritonServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a remote Triton cannot open our /dev/shm: emulate it with a key its host does not have
    monkeypatch.setattr(
        triton_shm.ShmChannel, "_key", lambda self, region: f"/absent-{region.name}"
    )
    rng = np.random.default_rng(3)
    async with (
        TritonClient(echo_triton.grpc_url, shared_memory="auto") as remote,
        TritonClient(echo_triton.grpc_url, shared_memory="off") as off,
    ):
        for client in (remote, off):
            call = merged(FP16, [job_inputs(rng), job_inputs(rng)])
            check(await client.infer(call), call, np.float16)
            assert not client.uses_shared_memory
            assert client.shm is None
    async with TritonClient(echo_triton.grpc_url, shared_memory="on") as required:
        with pytest.raises(Exception, match="Unable to open shared memory region"):
            await required.infer(merged(FP16, [job_inputs(rng)]))


async def test_a_triton_restart_between_steps_is_survived(tmp_path: Path) -> None:
    echo.write_repository(tmp_path / "repository", [("tiny", "fp16")])
    rng = np.random.default_rng(4)
    jobs = [job_inputs(rng), job_inputs(rng)]
    with TritonServer(tmp_path / "repository", work_dir=tmp_path / "run", startup_timeout=180) as s:
        async with TritonClient(s.grpc_url, shared_memory="on") as client:
            call = merged(FP16, jobs)
            check(await client.infer(call), call, np.float16)
            assert client.shm is not None
            generation, staged = client.shm.generation, client.shm.bytes_staged
            s.stop()
            s.start()  # same ports, registrations forgotten
            s.wait_ready()
            for _ in range(2):
                for j in jobs:
                    j["sample"] = rng.standard_normal(j["sample"].shape, dtype=np.float32)
                call = merged(FP16, jobs)
                check(await client.infer(call), call, np.float16)
            assert client.shm.generation == generation + 1  # re-registered once
            assert client.shm.bytes_staged == staged  # our bytes survived: nothing rewritten
            assert client.uses_shared_memory
