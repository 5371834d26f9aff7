"""Text VAE parity with the reference fixtures (spec §2): encode, posterior, full and cached decode."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from cdlm.errors import DataError
from cdlm_cola.config import ColaVaeConfig
from cdlm_cola.state_dict import load_pretrained_vae
from cdlm_cola.vae import ColaTextVAE, posterior, posterior_sample
from conftest import shared_path

ATOL = 1e-5
TINY = {"vocab_size": 50, "dim": 32, "ffn_dim": 64, "num_heads": 2, "latent_dim": 4, "block_size": 2}


def close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def fx() -> dict[str, Tensor]:
    return load_file(shared_path("fixtures", "cola", "forward_fp32.safetensors"))


@pytest.fixture(scope="module")
def vae() -> ColaTextVAE:
    return load_pretrained_vae(shared_path("fixtures", "cola", "cola_vae"))


@torch.no_grad()
def test_encode_matches_reference(vae: ColaTextVAE, fx: dict[str, Tensor]) -> None:
    enc = vae.encode([fx[f"vae/encode/in/input_ids_{i}"] for i in range(3)])
    assert enc.params is not None
    for i in range(3):
        close(enc.latents[i], fx[f"vae/encode/out/latents_{i}"])
        close(enc.params[i], fx[f"vae/encode/out/params_{i}"])  # [LN(mean) | raw logvar]
        post = posterior(enc.params[i])
        close(post.logvar, fx[f"vae/encode/out/logvar_clamped_{i}"])
        close(post.std, fx[f"vae/encode/out/std_{i}"])
    close(posterior_sample(enc.params[0], torch.Generator().manual_seed(99)), fx["vae/encode/out/sample_0_seed99"])


def test_posterior_clamps_logvar_but_keeps_raw_params() -> None:
    params = torch.tensor([[0.5, 40.0], [-1.0, -50.0]])
    post = posterior(params)
    assert post.logvar.tolist() == [[20.0], [-30.0]] and post.mean.tolist() == [[0.5], [-1.0]]
    assert params[0, 1] == 40.0


@torch.no_grad()
def test_decode_full_matches_reference(vae: ColaTextVAE, fx: dict[str, Tensor]) -> None:
    lens = fx["vae/decode_full/in/txt_shape"]
    close(vae.decode(fx["vae/decode_full/in/z"], lens, lens), fx["vae/decode_full/out/logits"][0])


@torch.no_grad()
def test_decode_with_cache_matches_reference(vae: ColaTextVAE, fx: dict[str, Tensor]) -> None:
    prefix_lens = fx["vae/decode_cache/in/prefix_lens"]
    _, prefilled = vae.decode_commit(fx["vae/decode_cache/in/prefix_z"], prefix_lens, prefix_lens)
    k_lens, q_lens = fx["vae/decode_cache/in/block_txt_shape"], fx["vae/decode_cache/in/block_txt_q_shape"]
    logits, committed = vae.decode_commit(fx["vae/decode_cache/in/block_z"], k_lens, q_lens, prefilled)
    close(logits, fx["vae/decode_cache/out/logits_block2"][0])
    with pytest.raises(DataError, match="8 cached"):  # the commit stored 8 per sample: k must be 12 now
        vae.decode(fx["vae/decode_cache/in/block_z"], k_lens, q_lens, cache=committed)
    # the committed cache is a new one; the prefill reads as before
    close(vae.decode(fx["vae/decode_cache/in/block_z"], k_lens, q_lens, cache=prefilled), logits)
    close(
        vae.decode(fx["vae/decode_cache/in/prefix_z"], prefix_lens, prefix_lens),
        vae.decode(fx["vae/decode_cache/in/prefix_z"], [4, 4], [4, 4]),
    )


def test_release_size_builds_on_meta() -> None:
    with torch.device("meta"):
        model = ColaTextVAE(ColaVaeConfig())
    assert sum(p.numel() for p in model.parameters()) == 501_871_574
    assert len(model.state_dict()) == 133


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"post_norm": False, "act": "gelu", "qk_norm": False},
        {"patch_size": 2, "act": "silu", "clip_qkv": 0.5},
        {"use_variation": False, "qk_bias": True, "bias": False},
    ],
)
@torch.no_grad()
def test_cached_decode_equals_full_decode(overrides: dict[str, object]) -> None:
    config = ColaVaeConfig(**TINY, encoder_num_blocks=1, decoder_num_blocks=2, **overrides)
    vae = ColaTextVAE(config, generator=torch.Generator().manual_seed(0)).eval()
    ps = vae.config.patch_size
    z = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))  # samples of 6 and 4 latents
    full = vae.decode(z, [6, 4], [6, 4]).unflatten(0, (-1, ps))  # (10, ps, V)
    _, cache = vae.decode_commit(torch.cat([z[:4], z[6:8]]), [4, 2], [4, 2])
    tail = vae.decode(torch.cat([z[4:6], z[8:10]]), [6, 4], [2, 2], cache=cache).unflatten(0, (-1, ps))
    torch.testing.assert_close(tail, torch.cat([full[4:6], full[8:10]]), atol=1e-5, rtol=0)
    ids = [torch.arange(6 * ps) % 50, torch.arange(2 * ps)]
    assert [t.shape for t in vae.encode(ids).latents] == [(6, 4), (2, 4)]


def test_encode_rejects_lengths_off_the_patch_grid() -> None:
    vae = ColaTextVAE(ColaVaeConfig(**TINY, patch_size=2, encoder_num_blocks=1, decoder_num_blocks=1))
    with pytest.raises(DataError, match=r"ids\[1\]: expected a non-empty 1-D tensor of length k·2, got \(3,\)"):
        vae.encode([torch.arange(4), torch.arange(3)])
