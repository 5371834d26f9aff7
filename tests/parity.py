"""Platform-robust parity: which fp32 values legitimately differ between CPUs, and how the tests pin or bound them.

The golden fixtures were written on one x86 machine (MKL's exp/sin/cos, torch's AVX2/AVX-512 kernels). Another
CPU or libm (glibc, SLEEF, numpy's SIMD, ARM, a CPU without AVX2) may round exp, pow, sigmoid, sin and cos
differently by an ulp or so, and torch.randn's Box–Muller differs between its AVX2/AVX-512 kernel and the scalar
one other CPUs run (ATEN_CPU_CAPABILITY=default: 38% of draws differ, by ≤ 1.43e-6). That is harmless for O(1)
arguments, but Cola multiplies the time by 1000 before its sinusoid, so one ulp of a frequency or of τ becomes
≈ 3e-5 rad at 1000 rad (1000·ulp(f)) and then ≈ 3e-5 in DiT outputs compared at 1e-5. So the tests:

* bound the op itself with a tolerance derived from its fp32 error (:func:`sinusoid_atol`, :func:`assert_ulps`,
  :data:`RANDN_ATOL`), stated in one line next to each use;
* feed the network-output checks the fixture machine's own values of the amplified inputs, reproduced portably
  (:func:`pin_reference_sinusoid`, :func:`reference_sigmoid`: IEEE fp32 arithmetic plus fp64 transcendentals
  rounded once, the same on every CPU), so those checks keep their 1e-5.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from conftest import SHARED

EPS32 = torch.finfo(torch.float32).eps  # 2^-23: ulp(1.0); ulp(x) ≤ EPS32·|x| for every normal fp32 x
# randn = r·cos(2πu), r ≤ √(2·ln 2^24) = 5.77: the AVX2 kernel forms 2πu in fp32 (≤ ulp(2π)/2 = 2.4e-7 rad), the scalar
# one in fp64, and log/sin/cos may differ by 1 ulp: |Δ| ≤ 5.77·(2.4e-7 + 3·EPS32) = 3.5e-6 (measured: 1.43e-6)
RANDN_ATOL = 3.5e-6


def sinusoid_atol(t: Tensor, dim: int = 256) -> Tensor:
    """Per-element bound (N, dim) on |Δ| between two CPUs' fp32 ``[sin(t·f) | cos(t·f)]``, f_k = exp(x_k),
    x_k = −ln(1e4)·k/(dim/2), as in Cola's timestep embedding (t up to 1000, so |θ| up to 1000 rad).

    fp32 f_k is ≤ (|x_k| + 1)·EPS32 relative off (x_k rounded, exp ≤ 1 ulp) and θ = t·f rounds ≤ ½ ulp, so
    |Δθ| ≤ (|x_k| + 2)·EPS32·|θ|; sin/cos add ≤ 1 ulp of a value ≤ 1 on each side (2·EPS32). Measured against the
    fixture: glibc expf/sinf/cosf 2.8e-5 and numpy's fp32 SIMD 6.1e-5 at |θ| ≈ 1000, where this allows 2.4e-4.
    """
    half = dim // 2
    x = math.log(10000) * torch.arange(half, dtype=torch.float64) / half  # |x_k|
    angles = t.double()[:, None] * torch.exp(-x)  # (N, half) exact θ
    atol = EPS32 * ((x + 2) * angles.abs() + 2)
    return torch.cat([atol, atol], dim=-1)  # sin and cos columns


def assert_within(actual: Tensor, expected: Tensor, atol: Tensor) -> None:
    """Assert |actual − expected| ≤ atol element-wise (atol broadcast), naming the worst element."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    excess = diff - atol.double().expand_as(diff)
    worst = int(excess.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
    assert excess.max() <= 0, (
        f"{int((excess > 0).sum())} / {diff.numel()} elements beyond tolerance; worst |Δ| "
        f"{diff.flatten()[worst]:.3e} at {index} (allowed {atol.double().expand_as(diff).flatten()[worst]:.3e})"
    )


def assert_ulps(actual: Tensor, expected: Tensor, max_ulps: int) -> None:
    """Assert fp32 ``actual`` is within ``max_ulps`` units in the last place of ``expected``, element-wise."""
    ulp = torch.nextafter(expected.abs(), torch.tensor(math.inf)) - expected.abs()  # (…,) fp32
    assert_within(actual, expected, max_ulps * ulp)


def assert_same_weights(written: dict[str, Tensor], official: dict[str, Tensor]) -> None:
    """Assert the same keys and bit-identical tensors, except the Cola DiT's ``rope.freqs`` buffers, which are
    recomputed as 1/θ^x: pow is ≤ 1 ulp per libm and the division ½ ulp, so two CPUs agree to ≤ 3 ulp (numpy: 2)."""
    assert written.keys() == official.keys(), sorted(set(written) ^ set(official))
    for key, value in written.items():
        if key.endswith(".rope.freqs"):
            assert_ulps(value, official[key], 3)
        else:
            assert torch.equal(value, official[key]), key


def reference_sigmoid(x: Tensor) -> Tensor:
    """torch's fp32 CPU sigmoid, 1/(1 + e^−x), with e^−x correctly rounded: the fixture machine's values, any CPU.

    Every logit-normal τ of the Cola training fixtures is reproduced bit for bit, whereas the correctly rounded σ is
    1 ulp off for 2 of the 3 τ of ``sft_block_boundary_all_token`` (1000·τ by 3e-5 and 6e-5).
    """
    e = torch.exp(-x.double()).float()  # fp64 exp rounded once = correctly rounded fp32 exp
    return 1.0 / (1.0 + e)  # fp32 IEEE add and division: the same on every CPU


@functools.cache
def _reference_frequencies(dim: int) -> Tensor:
    """The fixture machine's fp32 sinusoid frequencies f_k = exp(−ln(1e4)·k/half), read back from its own rows.

    Its exp is not correctly rounded (k = 12 and 106 lie 0.48 ulp from a tie and were rounded up; 1000·ulp(f_12) =
    3e-5 rad), so f_k is taken, per k, as the fp32 neighbour of the correctly rounded value whose angles fp32(t·f)
    reproduce the fixture's ``comp/sinusoidal`` rows (t up to 1000) best.
    """
    fx = load_file(SHARED / "fixtures" / "cola" / "forward_fp32.safetensors")
    t, emb = fx["comp/sinusoidal/t"], fx["comp/sinusoidal/emb256"]  # (N,), (N, 256)
    half = dim // 2
    assert emb.shape[1] == dim, f"the fixture sinusoid has width {emb.shape[1]}, not {dim}"
    x = -math.log(10000) * torch.arange(half, dtype=torch.float32) / half  # IEEE fp32, as the reference computes it
    rounded = torch.exp(x.double()).float()  # (half,) correctly rounded
    candidates = torch.stack(  # rounded first: a tie keeps it
        [rounded, torch.nextafter(rounded, torch.tensor(0.0)), torch.nextafter(rounded, torch.tensor(1.0))]
    )  # (3, half)
    angles = t.float()[None, :, None] * candidates[:, None, :]  # (3, N, half) fp32 products: IEEE, any CPU
    err = (torch.sin(angles.double()) - emb[:, :half]).abs() + (torch.cos(angles.double()) - emb[:, half:]).abs()
    freqs = candidates.gather(0, err.amax(dim=1).argmin(dim=0)[None])[0]  # (half,)
    got = _sinusoid(t, freqs)
    assert (got - emb).abs().max() <= EPS32, "the fixture's sinusoid is not reproduced: not exp(−ln(1e4)·k/128)?"
    return freqs


def _sinusoid(t: Tensor, freqs: Tensor) -> Tensor:
    angles = t.float()[:, None] * freqs.to(t.device)[None, :]  # (N, half) fp32 IEEE products
    return torch.cat([torch.sin(angles.double()), torch.cos(angles.double())], dim=-1).float()  # rounded once


def reference_sinusoid(t: Tensor, dim: int = 256) -> Tensor:
    """Cola's ``[sin(t·f) | cos(t·f)]`` (N, dim) as the fixture machine computed it (to ≤ 1 ulp), on any CPU."""
    return _sinusoid(t, _reference_frequencies(dim))


def pin_reference_sinusoid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the Cola DiT embed its timesteps with :func:`reference_sinusoid` (no-op without the fixtures).

    The DiT's own sinusoid is checked against the fixture by ``test_sinusoidal_embedding_matches_reference``
    within :func:`sinusoid_atol`; pinned here, every DiT output is compared to the reference's at 1e-5 on any CPU,
    where a 1-ulp libm difference in the CPU's own sinusoid at t ≤ 1000 moves them by up to 5e-5 (simulated: one
    frequency or angle an ulp off, value-keyed), and free-running latents by up to 1.3e-4 (allowed 1e-4).
    """
    if (SHARED / "fixtures" / "cola" / "forward_fp32.safetensors").exists():
        import cdlm_cola.dit

        monkeypatch.setattr(cdlm_cola.dit, "sinusoidal_embedding", reference_sinusoid)
