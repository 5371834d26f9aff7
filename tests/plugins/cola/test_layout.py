"""NA layout: positions, block-causal masks (spec §4) against the reference's fixtures, and length checks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from cdlm.errors import DataError
from cdlm_cola.kv_cache import BlockKV, LayerKV
from cdlm_cola.layout import (
    BlockAttention,
    NaAttention,
    as_lengths,
    check_lengths,
    k_positions,
    na_block_causal_mask,
    padded_block_layout,
    q_positions,
    twol_block_causal_mask,
    twol_positions,
)
from cdlm_cola.rope import Rotary
from conftest import shared_path

BLOCKED = torch.finfo(torch.float32).min


@pytest.fixture(scope="module")
def fx() -> dict[str, Tensor]:
    return load_file(shared_path("fixtures", "cola", "forward_fp32.safetensors"))


def brute_force_na(k_lens: list[int], q_lens: list[int], bs: int) -> Tensor:
    """The definition of spec §4.2, one (query, key) pair at a time."""
    rows = []
    for s, (k, q) in enumerate(zip(k_lens, q_lens, strict=True)):
        for qp in range(k - q, k):
            row = []
            for s2, k2 in enumerate(k_lens):
                row += [s2 == s and qp // bs >= kp // bs for kp in range(k2)]
            rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


def test_positions_restart_per_sample_and_queries_are_the_tail() -> None:
    assert k_positions([3, 2]).tolist() == [0, 1, 2, 0, 1]
    assert q_positions([8, 4, 5], [4, 4, 0]).tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    assert twol_positions([3, 1]).tolist() == [0, 1, 2, 0, 1, 2, 0, 0]


def test_na_mask_matches_reference(fx: dict[str, Tensor]) -> None:
    ref = fx["comp/na_mask/mask"]
    mask = na_block_causal_mask(as_lengths(fx["comp/na_mask/txt_shape"], "k"), [4, 4, 12], 4, torch.float32)
    assert mask.shape == ref.shape == (1, 1, 20, 24)
    assert torch.equal(mask == 0, ref == 0)
    assert torch.equal(mask, ref)  # blocked entries are exactly finfo(float32).min


@pytest.mark.parametrize(
    ("k_lens", "q_lens", "bs"), [([5, 8, 3], [5, 4, 1], 2), ([7, 1, 6], [3, 1, 6], 3), ([4], [4], 1)]
)
def test_na_mask_is_the_definition(k_lens: list[int], q_lens: list[int], bs: int) -> None:
    mask = na_block_causal_mask(k_lens, q_lens, bs, torch.float32)[0, 0]
    assert torch.equal(mask == 0, brute_force_na(k_lens, q_lens, bs))
    assert set(mask.unique().tolist()) == {0.0, BLOCKED}


def test_twol_mask_matches_reference(fx: dict[str, Tensor]) -> None:
    ref = fx["comp/2l_mask/mask"]  # seq_lens [8, 4], per-sample block sizes [4, 2]
    assert torch.equal(twol_block_causal_mask([8, 4], [4, 2], torch.float32), ref)
    assert torch.equal(twol_block_causal_mask([8, 4], 4, torch.float32), fx["dit/2l/in/mask"])
    assert torch.equal(twol_positions([8, 4]), fx["dit/2l/in/position_ids"])


def test_twol_noisy_rows_see_clean_past_blocks_and_own_noisy_block() -> None:
    allowed = twol_block_causal_mask([4], 2, torch.float32)[0, 0] == 0  # [clean 0..3 | noisy 0..3], bs 2
    assert allowed[6].tolist() == [True, True, False, False, False, False, True, True]  # noisy block 1
    assert allowed[4].tolist() == [False, False, False, False, True, True, False, False]  # noisy block 0
    assert allowed[1].tolist() == [True, True, False, False, False, False, False, False]  # clean block 0


def test_attention_equals_explicit_softmax_and_has_no_nan() -> None:
    g = torch.Generator().manual_seed(0)
    k_lens, q_lens = [8, 4], [4, 4]
    q, k, v = (torch.randn(n, 2, 8, generator=g) for n in (8, 12, 12))
    mask = na_block_causal_mask(k_lens, q_lens, 4, torch.float32)
    zero = Rotary.at(torch.zeros(12, dtype=torch.long), 8, 1e4, "half")  # angle 0: identity rotation
    rot_q = Rotary(zero.cos[:8], zero.sin[:8], "half")
    out = NaAttention(q_lens, rot_q, zero, mask).attend(q, k, v)
    scores = torch.einsum("qhd,khd->hqk", q, k) / 8**0.5 + mask[0]
    expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).flatten(1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert not out.isnan().any()


def test_block_attention_gives_the_numbers_of_per_call_attention() -> None:
    """History laid out padded and rotated once, new keys written in place: the per-call result to fp32 rounding."""
    g = torch.Generator().manual_seed(0)
    cache = LayerKV().appended(torch.randn(10, 2, 8, generator=g), torch.randn(10, 2, 8, generator=g), [6, 4])
    k_lens, q_lens, readers = [9, 7, 3], [3, 3, 3], [True, True, False]  # a fresh third sample reads no history
    rot_q, rot_k = (Rotary.at(p, 4, 1e4, "interleaved") for p in (q_positions(k_lens, q_lens), k_positions(k_lens)))
    mask = na_block_causal_mask(k_lens, q_lens, 2, torch.float32)
    per_call = NaAttention(q_lens, rot_q, rot_k, mask, readers=readers)
    width, slots, bias = padded_block_layout([6, 4, 0], 3, 2, torch.float32)
    assert (width, slots.tolist()) == (9, [0, 1, 2, 3, 4, 5, 11, 12, 13, 14])  # right-aligned, new keys last
    assert bias[1, :, :2].eq(BLOCKED).all()  # the padding of a shorter history
    assert bias[1, :2, -1].eq(BLOCKED).all() and bias[1, 2, 2:].eq(0).all()  # positions 4, 5 (block 2) skip 6
    keys, values = cache.flat()  # (10, 2, 8)
    wide_q = Rotary.at(q_positions(k_lens, q_lens), 4, 1e4, "interleaved", width=8)  # whole-head tables
    wide_k = Rotary.at(k_positions([6, 4]), 4, 1e4, "interleaved", width=8)
    block = BlockAttention(wide_q, bias.repeat_interleave(2, dim=0), 3)
    kv = BlockKV.laid_out(wide_k(keys), values, slots, 3, width)
    for _ in range(2):  # every call of the block overwrites the same slots
        q, k, v = (torch.randn(9, 2, 8, generator=g) for _ in range(3))
        torch.testing.assert_close(
            block.attend(q, *block.history(kv, k, v)[:2]), per_call.attend(q, *per_call.history(cache, k, v)[:2]),
            atol=1e-6, rtol=1e-6,
        )  # fmt: skip
    assert cache.lengths == [6, 4]


def test_a_commit_returns_a_new_history_and_leaves_the_one_it_read() -> None:
    g = torch.Generator().manual_seed(1)
    k0, v0, k1, v1 = (torch.randn(n, 2, 4, generator=g) for n in (3, 3, 2, 2))
    old = LayerKV().appended(k0, v0, [2, 1])
    assert old.lengths == [2, 1] and old.k[0].data_ptr() != k0.data_ptr()  # own copies, not views
    rot = Rotary.at(torch.arange(5), 4, 1e4, "interleaved")
    k, v, new = NaAttention([1, 1], rot, rot, None, commit=True).history(old, k1, v1)
    assert new is not None and new.lengths == [3, 2] and old.lengths == [2, 1]
    assert torch.equal(k, torch.cat([k0[:2], k1[:1], k0[2:], k1[1:]])) and torch.equal(v, torch.cat(new.v))
    read_k, read_v, none = NaAttention([1, 1], rot, rot, None).history(old, k1, v1)  # a read commits nothing
    assert none is None and torch.equal(read_k, k) and torch.equal(read_v, v)


def test_lengths_are_checked() -> None:
    check_lengths([12, 8], [4, 4], [8, 4], 8)
    with pytest.raises(DataError, match=r"k_lens\[1\] = 8, expected 12"):
        check_lengths([12, 8], [4, 4], [8, 8], 8)
    with pytest.raises(DataError, match="sum to 8 but the input has 9 rows"):
        check_lengths([4, 4], [4, 4], [], 9)
    with pytest.raises(DataError, match="cache holds 3 samples but the call has 2"):
        check_lengths([4, 4], [4, 4], [0, 0, 0], 8)
    with pytest.raises(DataError, match=r"\(B,\) or \(B, 1\)"):
        as_lengths(torch.ones(2, 2, dtype=torch.long), "k_lens")
    with pytest.raises(DataError, match=">= 0"):
        as_lengths([3, -1], "q_lens")
