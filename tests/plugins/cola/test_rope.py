"""RoPE of the DiT (interleaved, partial) and the VAE (half-split), from explicit positions (spec §2.3, §3.3, H1)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from cdlm_cola.layout import k_positions, q_positions, twol_positions
from cdlm_cola.rope import RopeLayout, Rotary, inv_freq, rope_angles
from conftest import shared_path
from parity import assert_ulps


@pytest.fixture(scope="module")
def fx() -> dict[str, Tensor]:
    return load_file(shared_path("fixtures", "cola", "forward_fp32.safetensors"))


def test_dit_angles_match_reference(fx: dict[str, Tensor]) -> None:
    angles_k = rope_angles(k_positions([8, 12]), 12, 1e4, "interleaved")
    angles_q = rope_angles(q_positions([8, 12], [4, 4]), 12, 1e4, "interleaved")
    torch.testing.assert_close(angles_k, fx["comp/dit_rope/freqs_k_lens8_12"], atol=1e-5, rtol=0)
    torch.testing.assert_close(angles_q, fx["comp/dit_rope/freqs_q_lens4_4_offsets4_8"], atol=1e-5, rtol=0)
    # 1/θ^x: pow is ≤ 1 ulp per libm and the division ½ ulp, so two CPUs agree to ≤ 3 ulp (numpy's fp32 pow: 2 ulp)
    assert_ulps(inv_freq(12, 1e4), fx["comp/dit_rope/inv_freq_buffer"], 3)


def test_interleaved_rotates_pairs_in_place_and_leaves_the_tail() -> None:
    x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(5)
    out = Rotary.at(pos, 12, 1e4, "interleaved")(x)
    theta = pos[:, None].float() * inv_freq(12, 1e4)[None, :]  # (5, 6), pair j = channels (2j, 2j+1)
    cos, sin = theta.cos()[:, None], theta.sin()[:, None]
    even, odd = x[..., 0:12:2], x[..., 1:12:2]
    torch.testing.assert_close(out[..., 0:12:2], even * cos - odd * sin, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[..., 1:12:2], odd * cos + even * sin, atol=1e-6, rtol=0)
    assert torch.equal(out[..., 12:], x[..., 12:])  # 4 channels per head are not rotated


def test_half_split_pairs_channel_j_with_j_plus_half() -> None:
    x = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(1))
    pos = torch.tensor([3, 0, 7, 2])
    out = Rotary.at(pos, 8, 5e5, "half")(x)
    theta = pos[:, None].float() * inv_freq(8, 5e5)[None, :]  # (4, 4), pair j = channels (j, j + 4)
    cos, sin = theta.cos()[:, None], theta.sin()[:, None]
    torch.testing.assert_close(out[..., :4], x[..., :4] * cos - x[..., 4:] * sin, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[..., 4:], x[..., 4:] * cos + x[..., :4] * sin, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_scores_depend_on_relative_position_only(layout: RopeLayout) -> None:
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 1, 8, generator=g), torch.randn(1, 1, 8, generator=g)

    def score(pq: int, pk: int) -> Tensor:
        rq = Rotary.at(torch.tensor([pq]), 8, 1e4, layout)(q)
        rk = Rotary.at(torch.tensor([pk]), 8, 1e4, layout)(k)
        return (rq * rk).sum()

    torch.testing.assert_close(score(5, 2), score(103, 100), atol=1e-4, rtol=0)


def test_explicit_positions_are_never_replaced_by_cached_canonical_ones() -> None:
    """Hazard H1: a long canonical call first must not change a later call with explicit 2L positions."""
    rope_angles(torch.arange(64), 12, 1e4, "interleaved")
    twol = rope_angles(twol_positions([8, 4]), 12, 1e4, "interleaved")
    canonical = rope_angles(torch.arange(8), 12, 1e4, "interleaved")
    assert torch.equal(twol[8:16], canonical) and torch.equal(twol[20:24], canonical[:4])
    assert torch.equal(
        rope_angles(torch.arange(24), 12, 1e4, "interleaved")[16:],
        rope_angles(torch.arange(16, 24), 12, 1e4, "interleaved"),
    )


def test_rope_runs_in_fp32_and_returns_the_input_dtype() -> None:
    x = torch.randn(3, 1, 8).to(torch.bfloat16)
    out = Rotary.at(torch.arange(3), 8, 1e4, "half")(x)
    assert out.dtype == torch.bfloat16
    expected = Rotary.at(torch.arange(3), 8, 1e4, "half")(x.float()).to(torch.bfloat16)
    assert torch.equal(out, expected)
