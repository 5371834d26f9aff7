"""ELF network: fixture parity through the official-checkpoint adapter, paper sizes on meta, init, wrappers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from cdlm.errors import DataError
from cdlm_elf.conditioning import ElfCond
from cdlm_elf.config import ElfConfig
from cdlm_elf.model import ElfDecoder, ElfDenoiser, ElfTransformer, apply_rope, rope_tables
from cdlm_elf.state_dict import ElfStateDictAdapter
from conftest import shared_path
from elf_fixture import fixture_config

ATOL = 1e-5
FORWARD_CASES = ["denoise", "decode", "mixed", "no_sc_input", "denoise_attn_mask", "cond_prefix", "cond_prefix_uncond"]
TINY = ElfConfig(max_length=16, latent_dim=8, hidden_size=32, depth=2, num_heads=4, bottleneck_dim=4, vocab_size=40)


def load_official(official: dict[str, Tensor]) -> ElfTransformer:
    """Build the fixture-size network and load an official state dict through the adapter, strictly."""
    cfg = fixture_config()
    network = ElfTransformer(cfg).eval()
    nn.ModuleDict({"network": network}).load_state_dict(ElfStateDictAdapter(cfg).from_official(official), strict=True)
    return network


@pytest.fixture(scope="module")
def network() -> ElfTransformer:
    return load_official(load_file(shared_path("fixtures", "elf", "model.safetensors")))


@pytest.fixture(scope="module")
def forward_pack() -> tuple[dict[str, Tensor], dict[str, str]]:
    path = shared_path("fixtures", "elf", "forward.safetensors")
    with safe_open(str(path), "pt") as f:
        gates = json.loads(f.metadata()["dsa"])
    return load_file(path), gates


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward_matches_reference(network: ElfTransformer, forward_pack: tuple, case: str) -> None:
    data, gates = forward_pack
    gate = {"none": None, "true": True, "false": False}.get(gates[case], data.get(f"{case}/in/dsa_tensor"))
    with torch.no_grad():
        out, logits = network(
            data[f"{case}/in/x"],
            data[f"{case}/in/t"],
            data[f"{case}/in/sc"],
            gate,
            data.get(f"{case}/in/attention_mask"),
        )
    torch.testing.assert_close(out, data[f"{case}/out/output"], atol=ATOL, rtol=0)
    expected_logits = data.get(f"{case}/out/decoder_logits")
    assert (logits is None) == (expected_logits is None)
    if expected_logits is not None:
        torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("weights", ["ema_params1", "params"])
def test_checkpoint_weights_match_reference(weights: str) -> None:
    ckpt = torch.load(shared_path("fixtures", "elf", "ckpt", "checkpoint_1"), map_location="cpu", weights_only=True)
    data = load_file(shared_path("fixtures", "elf", "forward_ckpt.safetensors"))
    with torch.no_grad():
        out, logits = load_official(ckpt[weights])(data["in/x"], data["in/t"], data["in/sc"])
    assert logits is None
    torch.testing.assert_close(out, data[f"out_{weights}/output"], atol=ATOL, rtol=0)


def test_wrappers_share_the_network_and_match_reference(network: ElfTransformer, forward_pack: tuple) -> None:
    data, _ = forward_pack
    C = network.latent_dim
    denoiser, decoder = ElfDenoiser(network), ElfDecoder(network)
    assert denoiser.network is decoder.network
    x, t, sc = data["denoise/in/x"], data["denoise/in/t"], data["denoise/in/sc"]
    with torch.no_grad():
        out = denoiser(x[..., :C], t, ElfCond(sc), self_cond=x[..., C:])
        logits = decoder(data["decode/in/x"][..., :C], ElfCond(data["decode/in/sc"]))
        no_sc = denoiser(x[..., :C], t, ElfCond(sc))
        zeros_sc, _ = network(torch.cat([x[..., :C], torch.zeros_like(x[..., :C])], -1), t, sc)
    torch.testing.assert_close(out, data["denoise/out/output"], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, data["decode/out/decoder_logits"], atol=ATOL, rtol=0)
    # the wrappers fold self_cond_proj into text_proj (ElfTransformer.trunk): equal up to fp32 rounding
    torch.testing.assert_close(no_sc, zeros_sc, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("depth", "hidden", "heads", "expected"),
    [(12, 768, 12, 104_579_940), (24, 1056, 16, 342_540_036), (32, 1280, 16, 652_103_332)],
    ids=["ELF-B", "ELF-M", "ELF-L"],
)
def test_paper_sizes_on_meta(depth: int, hidden: int, heads: int, expected: int) -> None:
    with torch.device("meta"):
        network = ElfTransformer(ElfConfig(depth=depth, hidden_size=hidden, num_heads=heads))
    assert sum(p.numel() for p in network.parameters()) == expected
    assert not any(name.startswith("rope") for name in network.state_dict())


def test_fresh_init_is_seeded_and_predicts_zero() -> None:
    a = ElfTransformer(TINY, generator=torch.Generator().manual_seed(0))
    b = ElfTransformer(TINY, generator=torch.Generator().manual_seed(0))
    c = ElfTransformer(TINY, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)
    assert torch.equal(a.blocks[1].norm2.weight, torch.ones(32))
    assert a.text_proj[0].bias is None
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(2))
    out, logits = a(x, torch.tensor([0.2, 0.9]), torch.full((2,), 3.0), decode_gate=True)
    assert torch.equal(out, torch.zeros(2, 16, 8))  # zero-initialised flow head (spec §1.4)
    assert logits is not None and logits.shape == (2, 16, 40) and logits.abs().sum() > 0


def test_rope_leaves_prefix_unrotated_and_meta_tables_rebuild() -> None:
    network = ElfTransformer(TINY)
    assert torch.equal(network.rope_cos[:12], torch.ones(12, 8)) and torch.equal(
        network.rope_sin[:12], torch.zeros(12, 8)
    )
    # text position 1, pair j rotates by 10000^(−2j/hd); each angle fills two interleaved slots
    angles = 10000.0 ** (-torch.arange(0, 8, 2) / 8)
    torch.testing.assert_close(network.rope_sin[13], torch.sin(angles).repeat_interleave(2))
    with torch.device("meta"):
        lazy = ElfTransformer(TINY)
    lazy.to_empty(device="cpu")
    lazy.init_weights(torch.Generator().manual_seed(0))
    assert torch.equal(lazy.rope_cos, network.rope_cos) and torch.equal(lazy.rope_sin, network.rope_sin)


def test_mode_tokens_are_gated_per_row() -> None:
    network = ElfTransformer(TINY, generator=torch.Generator().manual_seed(0)).eval()
    nn.init.normal_(network.flow_head.linear.weight, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(2))
    t, sc = torch.tensor([0.3, 0.7]), torch.tensor([1.0, 2.0])
    with torch.no_grad():
        off, _ = network(x, t, sc)
        on, _ = network(x, t, sc, decode_gate=True)
        mixed, _ = network(x, t, sc, decode_gate=torch.tensor([1.0, 0.0]))
        false, _ = network(x, t, sc, decode_gate=False)
    torch.testing.assert_close(mixed, torch.stack([on[0], off[1]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(false, off, atol=0, rtol=0)
    assert (on - off).abs().max() > 1e-4


def test_heads_stay_fp32_under_cpu_autocast() -> None:
    network = ElfTransformer(TINY, generator=torch.Generator().manual_seed(0)).eval()
    x, t = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([0.2, 0.9])
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out, logits = network(x, t, torch.ones(2), decode_gate=True)
    with torch.no_grad():
        _, logits32 = network(x, t, torch.ones(2), decode_gate=True)
    assert out.dtype == torch.float32 and logits is not None and logits.dtype == torch.float32
    torch.testing.assert_close(logits, logits32, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("shape", [(2, 16, 12), (2, 17, 16)], ids=["channels", "too-long"])
def test_bad_input_shape_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(DataError, match=r"ElfTransformer input x.*got \(2, 1[67], 1[26]\)"):
        ElfTransformer(TINY)(torch.zeros(shape), torch.zeros(2), torch.ones(2))


def test_rope_complex_form_is_bit_identical_to_the_real_form() -> None:
    x = torch.randn(2, 3, 20, 8, generator=torch.Generator().manual_seed(8))
    cos, sin = rope_tables(8, 16, 4)
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    real = x * cos + torch.stack((-odd, even), dim=-1).flatten(-2) * sin
    torch.testing.assert_close(apply_rope(x, cos, sin), real, atol=0, rtol=0)
    torch.testing.assert_close(apply_rope(x.bfloat16(), cos, sin).float(), real, atol=0.05, rtol=0)


def test_logit_rows_and_greedy_decode_match_the_full_head(network: ElfTransformer, forward_pack: tuple) -> None:
    data, _ = forward_pack
    C = network.latent_dim
    x, t, sc = data["decode/in/x"], data["decode/in/t"], data["decode/in/sc"]
    rows = torch.tensor([x.shape[0] - 1])
    with torch.no_grad():
        _, full = network(x, t, sc, decode_gate=True)
        _, some = network(x, t, sc, decode_gate=True, logit_rows=rows)
        decoder = ElfDecoder(network)
        logits = decoder(x[..., :C], ElfCond(sc))
        ids = decoder.greedy(x[..., :C], ElfCond(sc))
    torch.testing.assert_close(some, full[rows], atol=0, rtol=0)
    assert torch.equal(ids, logits.argmax(dim=-1))
