"""Cola's components: conditioning rows, the scaled embedder, teacher-forced replay of traced generation calls."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from cola_reference import RecomputeCond, recomputed_logits, recomputed_velocity
from safetensors.torch import load_file
from torch import Tensor

from cdlm.errors import DataError
from cdlm.interfaces import TokenBatch
from cdlm.sampling.guidance import classifier_free
from cdlm.sampling.tokens import select_tokens
from cdlm.sampling.types import Prediction
from cdlm_cola.components import (
    ColaCond,
    ColaDecoder,
    ColaDenoiser,
    ColaEmbedder,
    ColaGenerationState,
    ReferenceVAE,
)
from cdlm_cola.config import ColaConfig
from cdlm_cola.dit import ColaDiT
from cdlm_cola.schedule import ColaSchedule
from cdlm_cola.state_dict import load_pretrained_dit, load_pretrained_vae
from cdlm_cola.vae import ColaTextVAE
from conftest import shared_path
from parity import pin_reference_sinusoid

ATOL = 1e-5
SCALE, SHIFT = 1.3, 0.05  # the fixture VAE's scaling_factor / shifting_factor


def close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.fixture()
def vae() -> ColaTextVAE:
    return load_pretrained_vae(shared_path("fixtures", "cola") / "cola_vae")


@pytest.fixture()
def dit() -> ColaDiT:
    return load_pretrained_dit(shared_path("fixtures", "cola") / "cola_dit")


@pytest.fixture(autouse=True)
def _reference_time_embedding(monkeypatch: pytest.MonkeyPatch) -> None:
    pin_reference_sinusoid(monkeypatch)  # the DiT embeds t ≤ 1000 as the fixture machine did, on any CPU (parity.py)


def test_null_rows_drop_the_history_and_keep_the_repainted_positions() -> None:
    pinned = torch.tensor([[True, False], [False, False]])
    clean = torch.arange(8.0).view(2, 2, 2)
    cond = ColaCond((0, 6), None, pinned, clean)
    both = cond.with_null_rows()
    assert both.cached == (0, 6, None, None) and both.state is None and len(both) == 4
    assert both.pinned is not None and torch.equal(both.pinned, torch.cat([pinned, pinned]))
    z = torch.full((2, 2, 2), -1.0)
    assert cond.restore(z).tolist() == [[[0.0, 1.0], [-1.0, -1.0]], [[-1.0, -1.0], [-1.0, -1.0]]]
    history = (torch.ones(0, 2), torch.ones(6, 2))
    recompute = RecomputeCond((None, None), context=history).with_null_rows()  # benchmarks/cola_reference.py
    assert recompute.cached == (None,) * 4 and [c.shape[0] for c in recompute.context] == [0, 6, 0, 0]


def test_embedder_scales_the_posterior_mode_and_samples(vae: ColaTextVAE) -> None:
    fx = load_file(shared_path("fixtures", "cola", "forward_fp32.safetensors"))
    ids = [fx[f"vae/encode/in/input_ids_{i}"] for i in range(3)]  # 8, 12 and 4 tokens
    embedder = ColaEmbedder(vae)
    for i, z in enumerate(embedder.encode(ids)):
        close(z, (fx[f"vae/encode/out/latents_{i}"] - SHIFT) * SCALE)
    sampled = embedder.encode(ids[:1], torch.Generator().manual_seed(99))[0]
    close(sampled, (fx["vae/encode/out/sample_0_seed99"] - SHIFT) * SCALE)
    batch = TokenBatch(ids[2][None], torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.bool))
    close(embedder(batch), ((fx["vae/encode/out/latents_2"] - SHIFT) * SCALE)[None])  # (1, 4, 8)


@torch.no_grad()
@pytest.mark.parametrize(
    ("run", "planned"),
    [("greedy_cfg7_perSampleSeed66", False), ("greedy_cfg7_perSampleSeed66", True), ("greedy_cfg7_globalSeed0", True)],
)
def test_traced_generation_calls_replay_through_the_components(
    vae: ColaTextVAE, dit: ColaDiT, run: str, planned: bool
) -> None:
    """Teacher forcing (fixture README): every traced call, fed its traced inputs, gives its traced output.

    Each conditional / unconditional DiT pair runs as ONE batched forward of 2B rows, per call or through a
    per-block plan (the fast path); the prefill, commits and decodes go through a generation state; greedy token
    selection uses the traced logits and history.
    """
    fx = load_file(shared_path("fixtures", "cola", "generate_fp32.safetensors"))
    events = json.loads(shared_path("fixtures", "cola", "generate_fp32.json").read_text())[f"gen/{run}/events"]
    denoiser, decoder = ColaDenoiser(dit, ColaSchedule(ColaConfig())), ColaDecoder(vae)
    state: ColaGenerationState | None = None
    pending: dict[str, Any] | None = None  # a conditional DiT call waiting for its unconditional twin
    for event in events:

        def get(name: str, e: dict[str, Any] = event) -> Tensor:
            return fx[f"gen/{run}/{e['idx']:05d}_{e['kind']}/{name}"]

        if event["kind"] == "vae_encode":
            latents = ColaEmbedder(vae).encode([get(f"input_ids_{i}") for i in range(3)])
            for i, z in enumerate(latents):
                close(z, (get(f"latents_{i}") - SHIFT) * SCALE)
        elif event["kind"] == "dit" and event["update_kv"]:  # prefill or commit at t = 0
            if state is None:  # the prefill, of both networks' caches
                state = ColaGenerationState(denoiser, decoder, get("txt").split(get("txt_q_shape").flatten().tolist()))
            else:
                assert state.commit(get("txt").view(3, 4, 8)) == 1
        elif event["kind"] == "dit" and event["use_kv_cache"]:
            pending = event
        elif event["kind"] == "dit":
            assert pending is not None and torch.equal(get("txt"), get("txt", pending))
            ts = get("timestep").view(3, 4)
            t = 1 - ts.max(dim=1).values / 1000  # core time of each row's block
            pinned = ts == 0  # repainted prompt positions (first block only)
            assert state is not None
            cond = state.cond(pinned if pinned.any() else None).with_null_rows()
            z = get("txt").view(3, 4, 8)
            plan = denoiser.plan(cond) if planned else None
            out = denoiser(torch.cat([z, z]), torch.cat([t, t]), cond, plan=plan).flatten(0, 1)  # (2·3·4, 8)
            close(out[:12], get("out", pending))
            close(out[12:], get("out"))
            pending = None
        elif event["kind"] == "vae_decode":
            assert state is not None
            if torch.equal(get("txt_shape"), get("txt_q_shape")):  # the prefill: the state made it with the DiT's
                assert state.vae is not None and state.vae.lengths == get("txt_q_shape").flatten().tolist()
            else:
                close(state.decode(get("z").view(3, 4, 8)), get("logits").view(3, 4, 320))
        else:
            previous = get("generated_ids") if f"gen/{run}/{event['idx']:05d}_sample/generated_ids" in fx else None
            ids = select_tokens(get("logits"), repetition_penalty=1.1, previous_ids=previous)
            assert torch.equal(ids, get("ids"))


@torch.no_grad()
def test_dit_reads_the_cache_per_sample(dit: ColaDiT) -> None:
    gen = torch.Generator().manual_seed(0)
    prefix, block = torch.randn(10, 8, generator=gen), torch.randn(8, 8, generator=gen)
    _, cache = dit.commit(prefix, [6, 4], [6, 4], 0.0)
    cond = dit(block, [10, 8], [4, 4], 500.0, cache=cache)
    fresh = dit(block, [4, 4], [4, 4], 500.0)
    mixed = dit(
        torch.cat([block, block]), [10, 8, 4, 4], [4] * 4, 500.0, cache=cache, readers=[True, True, False, False]
    )
    close(mixed, torch.cat([cond, fresh]))
    interleaved = dit(
        torch.cat([block[:4], block]), [4, 10, 8], [4] * 3, 500.0, cache=cache, readers=[False, True, True]
    )
    close(interleaved, torch.cat([fresh[:4], cond]))
    with pytest.raises(DataError, match="1 samples read the KV cache but it holds 2"):
        dit(block, [10, 4], [4, 4], 500.0, cache=cache, readers=[True, False])
    with pytest.raises(DataError, match="one flag per sample"):
        dit(block, [10, 8], [4, 4], 500.0, cache=cache, readers=[True])


@torch.no_grad()
def test_recomputed_history_equals_the_kv_cache(vae: ColaTextVAE, dit: ColaDiT) -> None:
    gen = torch.Generator().manual_seed(1)
    history = [torch.randn(n, 8, generator=gen) for n in (0, 8, 4)]
    z, t = torch.randn(3, 4, 8, generator=gen), torch.tensor([0.2, 0.5, 0.9])
    pinned = torch.tensor([[True, False, False, False]] * 3)
    denoiser, decoder = ColaDenoiser(dit, ColaSchedule(ColaConfig())), ColaDecoder(vae)
    recomputed = RecomputeCond((None,) * 3, pinned=pinned, context=tuple(history))  # benchmarks/cola_reference.py
    expected = recomputed_velocity(denoiser, torch.cat([z, z]), torch.cat([t, t]), recomputed.with_null_rows())
    logits = recomputed_logits(decoder, z, recomputed)
    state = ColaGenerationState(denoiser, decoder, history)  # the prefill of both caches
    cached = state.cond(pinned).with_null_rows()
    assert cached.cached == (0, 8, 4, None, None, None)
    close(denoiser(torch.cat([z, z]), torch.cat([t, t]), cached), expected)
    close(denoiser(torch.cat([z, z]), torch.cat([t, t]), cached, plan=denoiser.plan(cached)), expected)
    close(decoder(z, state.cond()), logits)
    dit_cache, vae_cache = state.dit, state.vae
    close(state.decode(z), logits)  # the block decode commits it to the decoder's cache only
    assert state.vae is not None and state.vae.lengths == [4, 12, 8] and state.dit is dit_cache
    assert vae_cache is not None and vae_cache.lengths == [0, 8, 4]  # a commit makes a new cache


def test_classifier_free_takes_one_scale_per_row() -> None:
    def toy(z: Tensor, t: Tensor, x_prev: Tensor, cond: Tensor) -> Prediction:
        out = z * cond[:, None, None] + t[:, None, None]
        return Prediction(x=out, v=2 * out)

    class Cond:
        def __init__(self, w: Tensor) -> None:
            self.w = w

        def with_null_rows(self) -> Tensor:
            return torch.cat([self.w, torch.zeros_like(self.w)])

    z, t = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2)), torch.tensor([0.1, 0.7])
    got = classifier_free(toy, Cond(torch.tensor([1.5, -2.0])), torch.tensor([7.0, 1.0]))(z, t, z)
    for row, scale in enumerate((7.0, 1.0)):
        c, u = toy(z, t, z, torch.tensor([1.5, -2.0])), toy(z, t, z, torch.zeros(2))
        close(got.v[row], u.v[row] + scale * (c.v[row] - u.v[row]))
        close(got.x[row], u.x[row] + scale * (c.x[row] - u.x[row]))


def test_reference_vae_takes_the_live_weights_when_anchored(vae: ColaTextVAE) -> None:
    live = load_pretrained_vae(shared_path("fixtures", "cola", "cola_vae"))
    ref = ReferenceVAE(live)
    assert set(ref.state_dict()) == set(live.state_dict()) | {"synced"} and not ref.synced
    with torch.no_grad():
        live.decoder.final_layer.bias.add_(1.0)  # "Stage 1 trained the VAE" after the reference was built
    ids = [torch.tensor([5, 6, 7, 8])]
    ref.encode(ids)  # encoding has no side effect: the reference still holds the weights it was built with
    assert not ref.synced and not torch.equal(ref.decoder.final_layer.bias, live.decoder.final_layer.bias)
    ref.anchor(live)  # joint training starts
    assert ref.synced and torch.equal(ref.decoder.final_layer.bias, live.decoder.final_layer.bias)
    with torch.no_grad():
        live.encoder.final_layer.bias.add_(1.0)  # Stage 2 trains on; the reference stays, anchored once
    ref.anchor(live)
    assert not torch.equal(ref.encode(ids).latents[0], live.encode(ids).latents[0])
    close(ref.encode(ids).latents[0], vae.encode(ids).latents[0])
