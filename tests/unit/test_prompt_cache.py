"""The prompt-embedding cache: the LRU with its byte bound, the key, the model identity, and the
runner in front of a fake text encoder (no servers)."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.adapters.metrics import Metrics
from orchestrator.batcher import StepBatcher
from orchestrator.config import load_settings
from orchestrator.core.pipeline import ENCODE_PROMPT, UNET, VAE_DECODER, VAE_ENCODER, start_job
from orchestrator.core.prompt_cache import (
    ENTRY_OVERHEAD_BYTES,
    EmbeddingCache,
    PromptKey,
    ensemble_steps,
    entry_bytes,
    frozen_row,
    model_identity,
    prompt_bytes,
)
from orchestrator.domain import GenerationRequest, StageCall
from orchestrator.errors import InferenceError, TransientInferenceError
from orchestrator.executor import run_job
from orchestrator.prompt_cache import (
    PromptCacheRunner,
    identity_of,
    prompt_cache_runner,
    triton_identity,
)
from tests.unit.test_validation import INFO

Outputs = dict[str, npt.NDArray[Any]]
LENGTH, DIM = INFO.text_max_length, INFO.text_embed_dim


def row(value: float, size: int = 10) -> dict[str, npt.NDArray[Any]]:
    return {"text_embeds": np.full(size, value, np.float32)}


def key(text: str, identity: str = "m1") -> PromptKey:
    return PromptKey(identity, ENCODE_PROMPT, text.encode())


# -- the LRU ---------------------------------------------------------------------------------


def test_the_least_recently_used_entry_goes_first_when_entries_are_full() -> None:
    cache = EmbeddingCache(max_entries=2, max_bytes=10**6)
    cache.put(key("a"), row(1))
    cache.put(key("b"), row(2))
    assert cache.get(key("a")) is not None  # "a" is now the most recently used
    cache.put(key("c"), row(3))
    assert list(cache) == [key("a"), key("c")]
    assert cache.get(key("b")) is None
    assert cache.evictions == 1
    assert len(cache) == 2


def test_the_byte_bound_evicts_until_the_entries_fit() -> None:
    one = entry_bytes(key("a"), row(1, size=100))
    assert one == 100 * 4 + 1 + ENTRY_OVERHEAD_BYTES
    cache = EmbeddingCache(max_entries=100, max_bytes=2 * one + 10)
    for name in "abc":
        assert cache.put(key(name), row(1, size=100))
    assert list(cache) == [key("b"), key("c")]
    assert cache.bytes == 2 * one
    # replacing an entry charges only the difference
    cache.put(key("c"), row(2, size=50))
    assert cache.bytes == one + entry_bytes(key("c"), row(2, size=50))
    assert float(cache.get(key("c"))["text_embeds"][0]) == 2.0  # type: ignore[index]


def test_an_entry_larger_than_the_byte_bound_is_not_stored_and_evicts_nothing() -> None:
    cache = EmbeddingCache(max_entries=10, max_bytes=2000)
    assert cache.put(key("small"), row(1, size=10))
    assert not cache.put(key("huge"), row(1, size=1000))
    assert list(cache) == [key("small")]


@pytest.mark.parametrize(("entries", "size"), [(0, 10**6), (10, 0)])
def test_a_zero_bound_disables_the_cache(entries: int, size: int) -> None:
    cache = EmbeddingCache(entries, size)
    assert not cache.enabled
    assert not cache.put(key("a"), row(1))
    assert cache.get(key("a")) is None and len(cache) == 0


def test_clear_drops_everything() -> None:
    cache = EmbeddingCache(10, 10**6)
    cache.put(key("a"), row(1))
    cache.put(key("b"), row(1))
    assert cache.clear() == 2
    assert cache.bytes == 0 and len(cache) == 0


# -- keys and identity -----------------------------------------------------------------------


def test_keys_differ_by_identity_model_and_exact_text() -> None:
    assert key("a cat") == key("a cat")
    assert key("a cat") != key("a cat ")
    assert key("a cat") != key("a cat", identity="m2")
    assert key("a cat") != PromptKey("m1", "other_encoder", b"a cat")
    assert prompt_bytes("café") == "café".encode() == prompt_bytes("café".encode())
    with pytest.raises(TypeError):
        prompt_bytes(3)


DESCRIPTION = {
    "encode_prompt": {
        "config": {
            "name": "encode_prompt",
            "platform": "ensemble",
            "ensemble_scheduling": {
                "step": [{"model_name": "tokenizer"}, {"model_name": "text_encoder"}]
            },
        },
        "versions": ["1"],
    },
    "text_encoder": {"config": {"name": "text_encoder", "parameters": {"source": "tiny"}}},
}


def test_the_identity_is_canonical_and_follows_configs_and_versions() -> None:
    same = {k: DESCRIPTION[k] for k in reversed(list(DESCRIPTION))}
    assert model_identity(DESCRIPTION) == model_identity(same)
    bumped = {**DESCRIPTION, "encode_prompt": {**DESCRIPTION["encode_prompt"], "versions": ["2"]}}
    rebuilt = {
        **DESCRIPTION,
        "text_encoder": {"config": {"name": "text_encoder", "parameters": {"source": "/sd15"}}},
    }
    identities = {model_identity(d) for d in (DESCRIPTION, bumped, rebuilt)}
    assert len(identities) == 3
    assert ensemble_steps(DESCRIPTION["encode_prompt"]["config"]) == ["tokenizer", "text_encoder"]
    assert ensemble_steps({"name": "unet"}) == []


def test_endpoints_must_agree_on_the_identity() -> None:
    a = {"encode_prompt": {"config": {"name": "encode_prompt"}, "versions": ["1"]}}
    b = {"encode_prompt": {"config": {"name": "encode_prompt"}, "versions": ["2"]}}
    assert identity_of({"x:1": a, "y:1": a}) == model_identity(a)
    assert identity_of({"x:1": a, "y:1": b}) is None
    assert identity_of({}) is None


async def test_triton_identity_describes_the_ensemble_and_each_step() -> None:
    asked: list[list[str]] = []
    models = {
        "encode_prompt": DESCRIPTION["encode_prompt"],
        "tokenizer": {"config": {"name": "tokenizer"}, "versions": ["1"]},
        "text_encoder": {"config": {"name": "text_encoder"}, "versions": ["3"]},
    }

    async def describe(names: Any) -> dict[str, dict[str, Any]]:
        asked.append(list(names))
        return {"10.0.0.1:8001": {n: models[n] for n in names}}

    identity = await triton_identity(describe)()
    assert asked == [["encode_prompt"], ["text_encoder", "tokenizer"]]
    assert identity == model_identity(models)
    models["text_encoder"] = {"config": {"name": "text_encoder"}, "versions": ["4"]}
    assert await triton_identity(describe)() != identity


def test_a_cached_row_is_a_private_read_only_copy() -> None:
    batch = {"text_embeds": np.arange(6, dtype=np.float32).reshape(3, 2)}
    one = frozen_row(batch, 1)
    assert one["text_embeds"].tolist() == [2.0, 3.0]
    assert one["text_embeds"].base is None  # not a view of the whole batch
    with pytest.raises(ValueError):
        one["text_embeds"][0] = 9.0


# -- the runner ------------------------------------------------------------------------------


class TextEncoder:
    """A deterministic fake: each prompt's row depends on its text only; counts the rows."""

    def __init__(self) -> None:
        self.calls: list[list[bytes]] = []
        self.gate: asyncio.Event | None = None
        self.fail: BaseException | None = None

    @staticmethod
    def embed(text: bytes) -> npt.NDArray[np.float32]:
        seed = int.from_bytes(hashlib.sha256(text).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal((LENGTH, DIM), dtype=np.float32)

    @property
    def rows(self) -> int:
        return sum(len(c) for c in self.calls)

    async def infer(self, call: StageCall) -> Outputs:
        if self.gate is not None:
            await self.gate.wait()
        if call.model != ENCODE_PROMPT:
            return {"seen": np.zeros(1)}
        prompts = [bytes(v) for v in call.inputs["prompt"][:, 0]]
        self.calls.append(prompts)
        if self.fail is not None:
            raise self.fail
        out = {
            "text_embeds": np.stack([self.embed(p) for p in prompts]),
            "num_tokens": np.array([[len(p.split()) + 2] for p in prompts], dtype=np.int64),
        }
        return {name: out[name] for name in call.outputs}


def encode(*prompts: str) -> StageCall:
    arr = np.array([[p.encode()] for p in prompts], dtype=np.object_)
    return StageCall(ENCODE_PROMPT, {"prompt": arr}, ("text_embeds", "num_tokens"))


class Identity:
    def __init__(self, value: str | None = "m1") -> None:
        self.value = value
        self.reads = 0
        self.down = False

    async def __call__(self) -> str | None:
        self.reads += 1
        if self.down:
            raise TransientInferenceError("encode_prompt: UNAVAILABLE")
        return self.value


def runner(
    inner: Any, identity: Identity | None = None, entries: int = 1024, **kwargs: Any
) -> PromptCacheRunner:
    return PromptCacheRunner(
        inner, EmbeddingCache(entries, 64 * 1024**2), identity or Identity(), **kwargs
    )


async def expected(*prompts: str) -> Outputs:
    return await TextEncoder().infer(encode(*prompts))


def assert_same(got: Outputs, want: Outputs) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name])


async def test_a_warm_empty_negative_prompt_costs_no_row() -> None:
    inner = TextEncoder()
    cache = runner(inner)
    assert_same(await cache.infer(encode("", "a red fox")), await expected("", "a red fox"))
    assert inner.calls == [[b"", b"a red fox"]]
    # warm: the empty negative prompt comes from the cache, one row goes to the encoder
    assert_same(await cache.infer(encode("", "a blue bird")), await expected("", "a blue bird"))
    assert inner.calls[-1] == [b"a blue bird"]
    # and a repeated prompt costs nothing at all
    assert_same(await cache.infer(encode("", "a red fox")), await expected("", "a red fox"))
    assert len(inner.calls) == 2
    assert (cache.hits, cache.misses) == (3, 3)


async def test_a_merged_call_is_deduplicated_and_reassembled_in_order() -> None:
    inner = TextEncoder()
    cache = runner(inner)
    await cache.infer(encode("b"))
    prompts = ("", "a", "", "b", "", "a", "c")
    assert_same(await cache.infer(encode(*prompts)), await expected(*prompts))
    assert inner.calls[-1] == [b"", b"a", b"c"]  # each distinct miss once, "b" from the cache
    assert cache.misses == 1 + 3 and cache.hits == 7 - 3


async def test_concurrent_calls_share_one_encoding_of_a_prompt() -> None:
    inner = TextEncoder()
    inner.gate = asyncio.Event()
    cache = runner(inner)
    first = asyncio.create_task(cache.infer(encode("", "x")))
    await asyncio.sleep(0)
    second = asyncio.create_task(cache.infer(encode("", "y")))
    third = asyncio.create_task(cache.infer(encode("", "x")))
    await asyncio.sleep(0.01)
    inner.gate.set()
    got = await asyncio.gather(first, second, third)
    assert sorted(map(sorted, inner.calls)) == [[b"", b"x"], [b"y"]]
    for out, prompts in zip(got, [("", "x"), ("", "y"), ("", "x")], strict=True):
        assert_same(out, await expected(*prompts))


async def test_a_caller_that_gives_up_does_not_fail_those_sharing_its_prompt() -> None:
    inner = TextEncoder()
    inner.gate = asyncio.Event()
    cache = runner(inner)
    owner = asyncio.create_task(cache.infer(encode("", "x")))
    await asyncio.sleep(0)
    sharer = asyncio.create_task(cache.infer(encode("", "x")))
    await asyncio.sleep(0.01)
    owner.cancel()
    inner.gate.set()
    assert_same(await sharer, await expected("", "x"))
    assert inner.rows == 2
    with pytest.raises(asyncio.CancelledError):
        await owner


async def test_a_failure_reaches_every_sharer_and_is_not_cached() -> None:
    inner = TextEncoder()
    inner.gate = asyncio.Event()
    inner.fail = TransientInferenceError("encode_prompt: UNAVAILABLE", stage=ENCODE_PROMPT)
    identity = Identity()
    cache = runner(inner, identity)
    calls = [asyncio.create_task(cache.infer(encode("", "x"))) for _ in range(3)]
    await asyncio.sleep(0.01)
    inner.gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, TransientInferenceError) for r in results), results
    assert inner.rows == 2 and len(cache.cache) == 0
    reads = identity.reads
    inner.fail = None
    assert_same(await cache.infer(encode("", "x")), await expected("", "x"))
    # the failure made the runner read the model's identity again before serving
    assert identity.reads == reads + 1


async def test_an_answer_with_the_wrong_rows_is_an_error_not_an_entry() -> None:
    class Short(TextEncoder):
        async def infer(self, call: StageCall) -> Outputs:
            out = await super().infer(call)
            return {name: arr[:1] for name, arr in out.items()}

    cache = runner(Short())
    with pytest.raises(InferenceError, match="expected 2 rows"):
        await cache.infer(encode("a", "b"))
    assert len(cache.cache) == 0


async def test_a_model_change_never_serves_an_old_entry() -> None:
    inner = TextEncoder()
    identity = Identity("m1")
    now = [0.0]
    cache = runner(inner, identity, check_interval_s=10.0, clock=lambda: now[0])
    await cache.infer(encode("", "x"))
    now[0] = 5.0
    await cache.infer(encode("", "x"))
    assert identity.reads == 1 and inner.rows == 2  # within the interval: not read again
    identity.value = "m2"
    now[0] = 10.0
    await cache.infer(encode("", "x"))
    assert identity.reads == 2 and inner.rows == 4  # a new identity: encoded again
    assert {k.identity for k in cache.cache} == {"m2"}


async def test_an_unknown_identity_bypasses_the_cache() -> None:
    inner = TextEncoder()
    cache = runner(inner, Identity(None))
    for _ in range(2):
        assert_same(await cache.infer(encode("", "x", "")), await expected("", "x", ""))
    assert inner.rows == 6 and len(cache.cache) == 0


async def test_while_the_identity_cannot_be_read_nothing_is_served_from_the_cache() -> None:
    inner = TextEncoder()
    identity = Identity("m1")
    now = [0.0]
    cache = runner(inner, identity, check_interval_s=10.0, clock=lambda: now[0])
    await cache.infer(encode("", "x"))
    assert inner.rows == 2
    identity.down = True
    for t in (10.0, 10.5):  # the read fails, and until it is tried again: bypassed
        now[0] = t
        assert_same(await cache.infer(encode("", "x")), await expected("", "x"))
    assert inner.rows == 6 and cache.identity is None
    # unknown is asked again after a second, not the whole interval; the same model is back:
    # its entries are good again
    identity.down = False
    now[0] = 11.0
    await cache.infer(encode("", "x"))
    assert inner.rows == 6 and cache.identity == "m1"


async def test_other_calls_pass_through_untouched() -> None:
    seen: list[StageCall] = []

    class Recorder:
        async def infer(self, call: StageCall) -> Outputs:
            seen.append(call)
            return {"out": np.zeros(1)}

    cache = runner(Recorder())
    unet = StageCall(UNET, {"sample": np.zeros((1, 4, 8, 8), np.float32)}, ("noise_pred",))
    numeric = StageCall(ENCODE_PROMPT, {"prompt": np.zeros((2, 1), np.float32)}, ("text_embeds",))
    extra = StageCall(
        ENCODE_PROMPT, {**encode("a").inputs, "lora": np.zeros((1, 1), np.float32)}, ("x",)
    )
    for call in (unet, numeric, extra):
        await cache.infer(call)
    # the very same calls, none split or answered
    assert [id(c) for c in seen] == [id(unet), id(numeric), id(extra)]
    assert cache.hits == cache.misses == 0


async def test_the_entry_bound_holds_through_the_runner() -> None:
    inner = TextEncoder()
    cache = runner(inner, entries=3)
    for i in range(10):
        await cache.infer(encode("", f"prompt {i}"))
    assert len(cache.cache) == 3
    assert key("prompt 9", "m1") in cache.cache


async def test_metrics_count_hits_misses_and_size() -> None:
    class Pool(TextEncoder):
        async def describe_models(self, models: Any) -> dict[str, dict[str, Any]]:
            return {
                "127.0.0.1:8001": {m: {"config": {"name": m}, "versions": ["1"]} for m in models}
            }

    metrics = Metrics()
    pool = Pool()
    settings = load_settings(None, prompt_cache_entries=8)
    cached = prompt_cache_runner(pool, settings, metrics)
    assert isinstance(cached, PromptCacheRunner)
    for p in ("a", "b", "a", "c"):
        await cached.infer(encode("", p))
    values = {
        s.name: s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }
    assert values["orchestrator_prompt_cache_misses_total"] == 4  # "", a, b, c
    assert values["orchestrator_prompt_cache_hits_total"] == 4  # 3 x "" and the second "a"
    assert values["orchestrator_prompt_cache_entries"] == 4
    assert values["orchestrator_prompt_cache_bytes"] == cached.cache.bytes > 4 * LENGTH * DIM * 4
    # a zero bound: the pool itself, no cache at all
    assert prompt_cache_runner(pool, load_settings(None, prompt_cache_bytes=0)) is pool


class Models(TextEncoder):
    """The encoder plus a UNet and decoder whose outputs depend on the text embeddings, so an
    embedding served for the wrong row changes the image."""

    async def infer(self, call: StageCall) -> Outputs:
        if call.model == ENCODE_PROMPT:
            return await super().infer(call)
        x = call.inputs
        if call.model == UNET:
            cond = x["encoder_hidden_states"].mean(axis=(1, 2))[:, None, None, None]
            return {"noise_pred": x["sample"] * 0.1 + cond}
        f = INFO.vae_scale_factor
        shown = np.tanh(x["latent"][:, :3] / 8.0).repeat(f, axis=2).repeat(f, axis=3)
        return {"image": shown.astype(np.float32)}


async def test_sixteen_guided_jobs_through_the_batcher_give_the_same_images() -> None:
    requests = [
        GenerationRequest(
            prompt=f"prompt {i % 5}", seed=i, steps=3, scheduler="euler", guidance_scale=7.5
        )
        for i in range(16)
    ]
    max_rows = {UNET: 64, ENCODE_PROMPT: 64, VAE_ENCODER: 64, VAE_DECODER: 64}

    async def burst(inner: Any) -> list[npt.NDArray[np.uint8]]:
        batcher = StepBatcher(inner, max_rows)

        async def one(r: GenerationRequest) -> npt.NDArray[np.uint8]:
            async with batcher.job():
                return (await run_job(start_job(r, INFO), batcher)).images[0]

        return list(await asyncio.gather(*(one(r) for r in requests)))

    plain = Models()
    without = await burst(plain)
    models = Models()
    cached = runner(models)
    with_cache = await burst(cached)
    assert plain.rows == 32
    assert models.rows == 6  # "" and five prompts
    for a, b in zip(without, with_cache, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len({img.tobytes() for img in without}) == 16  # the images do differ from each other
