"""The tiny repository served by the real tritonserver: every model, through gRPC."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from orchestrator.adapters.triton_server import SHM_DIR, TritonServer, TritonServerError
from orchestrator.models import export

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_out(tiny_models: Path) -> Path:
    """The session's tiny build (tests/conftest.py): DIR/diffusers, DIR/onnx, DIR/repository."""
    return tiny_models


@pytest.fixture(scope="module")
def server(triton: TritonServer) -> TritonServer:
    """The session's tritonserver serving the tiny repository (tests/conftest.py)."""
    return triton


@pytest.fixture(scope="module")
def client(server: TritonServer) -> Iterator[Any]:
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def infer(
    client: Any, model: str, inputs: dict[str, npt.NDArray[Any]], outputs: list[str]
) -> dict[str, npt.NDArray[Any]]:
    tensors = []
    for name, array in inputs.items():
        dtype = "BYTES" if array.dtype == object else grpcclient.np_to_triton_dtype(array.dtype)
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    result = client.infer(
        model, tensors, outputs=[grpcclient.InferRequestedOutput(o) for o in outputs]
    )
    return {o: result.as_numpy(o) for o in outputs}


def facts(tiny_out: Path) -> export.ModelFacts:
    return export.load_components(tiny_out / "diffusers").facts


def test_server_urls(server: TritonServer, client: Any) -> None:
    assert server.grpc_url == f"127.0.0.1:{server.grpc_port}"
    assert client.is_server_ready()
    for name in (
        "tokenizer",
        "text_encoder",
        "encode_prompt",
        "vae_encoder",
        "unet",
        "vae_decoder",
    ):
        assert client.is_model_ready(name), name
    config = client.get_model_config("unet", as_json=True)["config"]
    assert config["parameters"]["size_multiple"]["string_value"] == "8"
    assert config["parameters"]["source"]["string_value"] == "tiny"


def test_tokenizer_and_encode_prompt(client: Any, tiny_out: Path) -> None:
    prompts = np.array([[b"a photo of a cat"], ["a caf\u00e9".encode()]], dtype=object)
    ids = infer(client, "tokenizer", {"prompt": prompts}, ["input_ids"])["input_ids"]
    assert ids.dtype == np.int64 and ids.shape == (2, 77)
    assert list(ids[0, :7]) == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()

    direct = export.run_onnx(tiny_out / "onnx" / "text_encoder.onnx", {"input_ids": ids})
    embeds = infer(client, "text_encoder", {"input_ids": ids}, ["text_embeds"])["text_embeds"]
    assert embeds.shape == (2, 77, 64)
    np.testing.assert_allclose(embeds, direct["text_embeds"], atol=1e-5, rtol=0)

    ensemble = infer(client, "encode_prompt", {"prompt": prompts}, ["text_embeds"])
    np.testing.assert_allclose(ensemble["text_embeds"], direct["text_embeds"], atol=1e-5, rtol=0)

    long_prompt = np.array([[("word " * 300).encode()]], dtype=object)
    long_ids = infer(client, "tokenizer", {"prompt": long_prompt}, ["input_ids"])["input_ids"]
    assert long_ids.shape == (1, 77) and long_ids[0, -1] == 49407


@pytest.mark.parametrize("stage", ["vae_encoder", "unet", "vae_decoder"])
def test_stage_matches_onnxruntime(client: Any, tiny_out: Path, stage: str) -> None:
    f = facts(tiny_out)
    spec = export.STAGE_SPECS[stage]
    path = tiny_out / "onnx" / f"{stage}.onnx"
    for batch, hw in ((1, None), (2, (8, 12))):
        inputs = export.sample_inputs(f, stage, batch, latent_hw=hw, seed=7 + batch)
        got = infer(client, stage, inputs, list(spec.outputs))
        want = export.run_onnx(path, inputs)
        for name in spec.outputs:
            assert got[name].shape == want[name].shape
            np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0)


def test_concurrent_requests_are_answered_separately(client: Any, tiny_out: Path) -> None:
    f = facts(tiny_out)
    path = tiny_out / "onnx" / "unet.onnx"
    requests = [export.sample_inputs(f, "unet", 1, seed=100 + i) for i in range(2)]
    requests[1]["timestep"] = np.array([[420.25]], dtype=np.float32)
    # a third request of another spatial size lands in its own group if batched together
    requests.append(export.sample_inputs(f, "unet", 1, latent_hw=(8, 8), seed=300))
    for _ in range(3):
        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            results = list(pool.map(lambda x: infer(client, "unet", x, ["noise_pred"]), requests))
        for inputs, result in zip(requests, results, strict=True):
            want = export.run_onnx(path, inputs)["noise_pred"]
            np.testing.assert_allclose(result["noise_pred"], want, atol=1e-5, rtol=0)


def test_bad_request_gets_an_error_and_server_survives(client: Any, tiny_out: Path) -> None:
    f = facts(tiny_out)
    bad = export.sample_inputs(f, "unet", 1, latent_hw=(7, 7))  # cannot be down/upsampled
    with pytest.raises(InferenceServerException):
        infer(client, "unet", bad, ["noise_pred"])
    good = export.sample_inputs(f, "unet", 1)
    assert infer(client, "unet", good, ["noise_pred"])["noise_pred"].shape == (1, 4, 16, 16)


def unet_counts(client: Any) -> tuple[int, int, int]:
    """Triton's statistics of the unet model: (successful requests, rows, executions)."""
    stats = client.get_inference_statistics("unet", as_json=True)["model_stats"][0]
    return (
        int(stats["inference_stats"]["success"].get("count", 0)),
        int(stats.get("inference_count", 0)),
        int(stats.get("execution_count", 0)),
    )


def test_unet_step_latency(client: Any, tiny_out: Path) -> None:
    """Per-step UNet latency at 64x64 (latent 16x16), batch 2 (cfg pair), printed for reports.

    What is timed must be the work it claims to be: every timed call (each with inputs of its
    own) returns what ONNX Runtime returns for those inputs, and Triton ran each as one
    execution of two rows. Speed itself is for the benchmarks, not an assertion here.
    """
    f = facts(tiny_out)
    path = tiny_out / "onnx" / "unet.onnx"
    warmup, runs = 3, 20
    inputs = [export.sample_inputs(f, "unet", 2, seed=500 + i) for i in range(warmup + runs)]
    before = unet_counts(client)
    for x in inputs[:warmup]:
        infer(client, "unet", x, ["noise_pred"])
    outputs = []
    started = time.perf_counter()
    for x in inputs[warmup:]:
        outputs.append(infer(client, "unet", x, ["noise_pred"])["noise_pred"])
    per_step = (time.perf_counter() - started) / runs
    print(f"\ntiny unet 64x64 batch 2 through Triton: {per_step * 1000:.1f} ms/step")
    after = unet_counts(client)
    calls = warmup + runs
    assert [a - b for a, b in zip(after, before, strict=True)] == [calls, 2 * calls, calls]
    for x, got in zip(inputs[warmup:], outputs, strict=True):
        want = export.run_onnx(path, x)["noise_pred"]
        assert got.shape == want.shape == (2, 4, 16, 16)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_start_failure_reports_log(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\n')
    (repo / "broken" / "1" / "model.py").write_text("raise RuntimeError('boom at import')\n")
    triton = TritonServer(repo, work_dir=tmp_path / "work")
    triton.start()
    with pytest.raises(TritonServerError) as info:
        triton.wait_ready(timeout=120)
    triton.stop()
    assert "boom at import" in str(info.value)


def test_stop_removes_the_shared_memory_of_a_killed_servers_python_stubs(tmp_path: Path) -> None:
    """A SIGKILLed tritonserver's Python stubs cannot unlink their /dev/shm regions (a full test
    run used to leave about 45 MB there); each server names its own, and stop() removes them."""
    model = tmp_path / "repo" / "noop"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'name: "noop"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [{ name: "x", data_type: TYPE_FP32, dims: [1] }]\n'
        'output [{ name: "y", data_type: TYPE_FP32, dims: [1] }]\n'
        "instance_group [{ kind: KIND_CPU, count: 1 }]\n"
    )
    (model / "1" / "model.py").write_text(
        "class TritonPythonModel:\n"
        "    def execute(self, requests):\n"
        "        import triton_python_backend_utils as pb\n"
        "        return [pb.InferenceResponse([pb.Tensor('y', pb.get_input_tensor_by_name(r, 'x')"
        ".as_numpy())]) for r in requests]\n"
    )
    triton = TritonServer(tmp_path / "repo", work_dir=tmp_path / "work")
    with triton:
        assert triton.pid is not None
        regions = list(SHM_DIR.glob(f"{triton.shm_prefix}*"))
        assert regions, sorted(p.name for p in SHM_DIR.iterdir())
        os.killpg(triton.pid, signal.SIGKILL)  # a crash, or a GroupGuard: nobody cleans up
        deadline = time.monotonic() + 30
        while triton.is_running():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert all(region.exists() for region in regions)
    assert not list(SHM_DIR.glob(f"{triton.shm_prefix}*"))
