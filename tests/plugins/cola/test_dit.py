"""DiT parity with the reference fixtures (spec §3): time embedding, NA forwards, KV cache, 2L layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from cdlm.errors import DataError
from cdlm_cola.config import ColaDitConfig
from cdlm_cola.dit import ColaDiT, sinusoidal_embedding
from cdlm_cola.layout import per_token_timesteps, twol_block_causal_mask, twol_positions
from cdlm_cola.state_dict import load_pretrained_dit, load_pretrained_vae
from conftest import shared_path
from parity import (
    EPS32,
    assert_within,
    pin_reference_sinusoid,
    reference_sinusoid,
    sinusoid_atol,
)

ATOL = 1e-5


def close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def fx() -> dict[str, Tensor]:
    return load_file(shared_path("fixtures", "cola", "forward_fp32.safetensors"))


@pytest.fixture()
def dit() -> ColaDiT:
    return load_pretrained_dit(shared_path("fixtures", "cola", "cola_dit"))


@pytest.fixture(autouse=True)
def _reference_time_embedding(monkeypatch: pytest.MonkeyPatch) -> None:
    pin_reference_sinusoid(monkeypatch)  # the DiT embeds t ≤ 1000 as the fixture machine did, on any CPU (parity.py)


def test_sinusoidal_embedding_matches_reference(fx: dict[str, Tensor]) -> None:
    t, expected = fx["comp/sinusoidal/t"], fx["comp/sinusoidal/emb256"]
    # |θ| = t·f ≤ 1000 rad: a 1-ulp libm difference in f or θ moves sin/cos by ~3e-5 between CPUs; bound per angle
    assert_within(sinusoidal_embedding(t), expected, sinusoid_atol(t))
    assert_within(reference_sinusoid(t), expected, torch.tensor(EPS32))  # what the DiT checks below embed with


@torch.no_grad()
@pytest.mark.parametrize(
    ("case", "timestep"),
    [
        ("self", "dit/self/in/timestep_per_token"),
        ("self_scalar_t700", torch.tensor(700.0)),
        ("self_scalar_t700", 700.0),
        ("self_per_sample_t", "dit/self_per_sample_t/in/timestep"),
    ],
)
def test_na_forward_matches_reference(dit: ColaDiT, fx: dict[str, Tensor], case: str, timestep: object) -> None:
    t = fx[timestep] if isinstance(timestep, str) else timestep
    lens = fx["dit/self/in/txt_shape"]  # [[8], [12], [4]]
    close(dit(fx["dit/self/in/txt"], lens, lens, t), fx[f"dit/{case}/out/txt_sample"])


@torch.no_grad()
def test_cached_generation_step_matches_reference(dit: ColaDiT, fx: dict[str, Tensor]) -> None:
    def get(name: str) -> Tensor:
        return fx[f"dit/cache/in/{name}"]

    prefix_lens, q_lens, block, t750 = get("prefix_lens"), get("txt_q_shape"), get("block"), get("timestep_block")
    _, prefilled = dit.commit(get("prefix"), prefix_lens, prefix_lens, torch.zeros(12))  # prefill
    assert prefilled.lengths == [8, 4]
    close(dit(block, get("cond_txt_shape"), q_lens, t750, cache=prefilled), fx["dit/cache/out/cond_t750"])
    close(dit(block, q_lens, q_lens, t750), fx["dit/cache/out/uncond_t750"])  # fresh sequence, RoPE 0..bs-1
    _, committed = dit.commit(block, get("cond_txt_shape"), q_lens, 0.0, prefilled)  # commit at t = 0
    out = dit(get("block3"), get("cond3_txt_shape"), q_lens, torch.full((8,), 250.0), cache=committed)
    close(out, fx["dit/cache/out/cond3_t250"])
    with pytest.raises(DataError, match=r"k_lens\[0\] = 12, expected 16"):  # the history is 12 + 4 long now
        dit(block, get("cond_txt_shape"), q_lens, t750, cache=committed)
    # a commit returns a new cache and leaves the one it read alone: the prefill still reads as before
    assert prefilled.lengths == [8, 4] and committed.lengths == [12, 8]
    close(dit(block, get("cond_txt_shape"), q_lens, t750, cache=prefilled), fx["dit/cache/out/cond_t750"])


@torch.no_grad()
def test_planned_steps_match_reference_and_forward(dit: ColaDiT, fx: dict[str, Tensor]) -> None:
    """The per-block fast path: one plan for a batched CFG call (cond rows read the cache, uncond rows fresh)."""

    def get(name: str) -> Tensor:
        return fx[f"dit/cache/in/{name}"]

    prefix_lens, block, t750 = get("prefix_lens"), get("block"), get("timestep_block")
    _, cache = dit.commit(get("prefix"), prefix_lens, prefix_lens, torch.zeros(12))  # prefill
    k_lens, q_lens, readers = [12, 8, 4, 4], [4] * 4, [True, True, False, False]
    plan = dit.plan(k_lens, q_lens, cache=cache, readers=readers)
    both, t_both = torch.cat([block, block]), torch.cat([t750, t750])
    expected = torch.cat([fx["dit/cache/out/cond_t750"], fx["dit/cache/out/uncond_t750"]])
    close(dit.step(both, t_both, plan), expected)
    pinned = t_both.clone()
    pinned[[0, 1, 8, 12]] = 0.0  # repainted positions: two distinct timesteps, spread by index
    for t in (pinned, torch.full((16,), 125.0), 900.0, t_both):  # the plan serves every Euler step of the block
        want = dit(both, k_lens, q_lens, t, cache=cache, readers=readers)
        # the plan batches rows differently, so BLAS sums in another (CPU- and MKL-path-dependent) order: measured
        # 1.0e-6 here and up to 1.3e-6 under MKL_CBWR=COMPATIBLE / ATEN_CPU_CAPABILITY=avx2; a real bug is ≫ 1e-4
        torch.testing.assert_close(dit.step(both, t, plan), want, atol=4e-6, rtol=1e-6)
    assert cache.lengths == [8, 4] and sorted(plan.heads) == [0.0, 125.0, 750.0, 900.0]  # filled by the steps
    fresh = dit.plan(q_lens, q_lens)
    assert fresh.kv == [None, None]
    close(dit.step(both, t_both, fresh), torch.cat([expected[8:], expected[8:]]))
    with pytest.raises(DataError, match=r"the plan is for 16 rows"):
        dit.step(block, t750, plan)
    with pytest.raises(DataError, match=r"k_lens\[0\] = 8, expected 12"):
        dit.plan([8, 8, 4, 4], q_lens, cache=cache, readers=readers)


@torch.no_grad()
def test_twol_training_forward_matches_reference(dit: ColaDiT, fx: dict[str, Tensor]) -> None:
    def get(name: str) -> Tensor:
        return fx[f"dit/2l/in/{name}"]

    pos, lens = get("position_ids"), get("txt_shape")
    out = dit(get("txt"), lens, lens, get("timestep"), k_positions=pos, q_positions=pos, mask=get("mask"))
    close(out, fx["dit/2l/out/txt_sample"])


@torch.no_grad()
def test_generation_trace_replays_call_by_call(dit: ColaDiT) -> None:
    """Teacher forcing of a whole reference generation: every DiT and VAE call, caches included (spec §6.1)."""
    run = "gen/greedy_cfg7_perSampleSeed66"
    trace = load_file(shared_path("fixtures", "cola", "generate_fp32.safetensors"))
    events = json.loads(shared_path("fixtures", "cola", "generate_fp32.json").read_text())[f"{run}/events"]
    vae = load_pretrained_vae(shared_path("fixtures", "cola", "cola_vae"))
    checked = {"dit": 0, "vae_decode": 0}
    dit_cache = vae_cache = None  # the caches the reference kept on its modules, here held by the caller
    for event in events:
        kind = event["kind"]
        x = {name.rsplit("/", 1)[1]: trace[name] for name in event["tensors"]}
        if kind == "dit":
            args = (x["txt"], x["txt_shape"], x["txt_q_shape"], x["timestep"])
            if event["update_kv"]:
                out, dit_cache = dit.commit(*args, dit_cache)
            else:
                out = dit(*args, cache=dit_cache if event["use_kv_cache"] else None)
            close(out, x["out"])
        elif kind == "vae_decode":
            args = (x["z"], x["txt_shape"], x["txt_q_shape"])
            if event["update_kv"]:
                logits, vae_cache = vae.decode_commit(*args, vae_cache)
            else:
                logits = vae.decode(*args, cache=vae_cache)
            close(logits, x["logits"].reshape(logits.shape))
        checked[kind] = checked.get(kind, 0) + 1
    assert checked["dit"] > 100 and checked["vae_decode"] == 5


def test_release_size_builds_on_meta() -> None:
    with torch.device("meta"):
        model = ColaDiT(ColaDitConfig(block_size=16))
    assert sum(p.numel() for p in model.parameters()) == 1_829_875_728
    assert len(model.state_dict()) == 446  # + 24 rope.freqs buffers in the official files


def test_timesteps_broadcast_per_token_per_sample_or_all() -> None:
    q_lens = [2, 3]
    assert per_token_timesteps(5.0, q_lens, torch.float32, torch.device("cpu")).tolist() == [5.0] * 5
    per_sample = per_token_timesteps(torch.tensor([1.0, 2.0]), q_lens, torch.float32, torch.device("cpu"))
    assert per_sample.tolist() == [1.0, 1.0, 2.0, 2.0, 2.0]
    with pytest.raises(DataError, match="expected 1, 5 \\(per row\\) or 2 \\(per sample\\) values, got 3"):
        per_token_timesteps(torch.ones(3), q_lens, torch.float32, torch.device("cpu"))


def test_bad_calls_are_rejected() -> None:
    config = ColaDitConfig(
        txt_in_channels=4, txt_out_channels=4, txt_dim=16, emb_dim=16, heads=2, head_dim=8, num_layers=1, rope_dim=4
    )
    dit = ColaDiT(config, generator=torch.Generator().manual_seed(0))
    z = torch.zeros(6, 4)
    with pytest.raises(DataError, match="given together"):
        dit(z, [6], [6], 1.0, k_positions=torch.arange(6))
    with pytest.raises(DataError, match=r"expected shapes \(6,\) / \(6,\), got \(\(6,\), \(5,\)\)"):
        dit(z, [6], [6], 1.0, k_positions=torch.arange(6), q_positions=torch.arange(5))
    with pytest.raises(DataError, match=r"mask: expected \(1, 1, 6, 6\)"):
        dit(z, [6], [6], 1.0, mask=torch.zeros(1, 1, 6, 7))
    with pytest.raises(DataError, match="sum to 5 but the input has 6 rows"):
        dit(z, [5], [5], 1.0)
    with pytest.raises(DataError, match=r"k_lens\[0\] = 8, expected 6: 0 cached"):
        dit(z, [8], [6], 1.0)


@torch.no_grad()
def test_equal_length_samples_attend_as_a_batch(dit: ColaDiT) -> None:
    """A per-sample mask for samples of equal lengths (2L training): the NA result, without the cross-sample mask."""
    g = torch.Generator().manual_seed(0)
    lens, sizes = [16, 16, 16], [4, 2, 4]
    txt, t = torch.randn(48, dit.config.txt_in_channels, generator=g), torch.rand(48, generator=g) * 1000
    pos = twol_positions([8, 8, 8])
    mask = twol_block_causal_mask([8] * 3, sizes, torch.float32)  # (1, 1, 48, 48) over the NA layout
    na = dit(txt, lens, lens, t, k_positions=pos, q_positions=pos, mask=mask)
    per_sample = torch.cat([twol_block_causal_mask([8], [bs], torch.float32) for bs in sizes])  # (3, 1, 16, 16)
    batched = dit(txt, lens, lens, t, k_positions=pos, q_positions=pos, mask=per_sample)
    torch.testing.assert_close(batched, na, atol=1e-6, rtol=1e-6)
    with pytest.raises(DataError, match="per sample for samples of equal lengths"):
        dit(txt, [16, 32], [16, 32], t, k_positions=pos, q_positions=pos, mask=per_sample)
