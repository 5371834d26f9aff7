from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from cdlm.sampling.grids import uniform
from cdlm.sampling.guidance import classifier_free, conditional, self_conditioning
from cdlm.sampling.solvers import integrate
from cdlm.sampling.types import Prediction


@dataclass(frozen=True)
class Cond:
    """Toy conditioning: a per-row offset; the null rows have offset 0."""

    offset: Tensor  # (B,)

    def with_null_rows(self) -> Cond:
        return Cond(torch.cat([self.offset, torch.zeros_like(self.offset)]))

    def repeated(self) -> Cond:
        return Cond(torch.cat([self.offset, self.offset]))


class Toy:
    """A DenoiseFn that records its calls; x and v depend on z, t, x_prev and the condition (in fp64)."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def __call__(self, z: Tensor, t: Tensor, x_prev: Tensor, cond: Cond) -> Prediction:
        self.rows.append(z.shape[0])
        shift = cond.offset[:, None, None]
        x = (torch.tanh(z) + 0.3 * x_prev + shift * (1 + t[:, None, None])).double()
        return Prediction(x=x, v=(x - z) / (1 - t[:, None, None]).clamp_min(0.05))


Z = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
T = torch.full((3,), 0.4)
X_PREV = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
COND = Cond(torch.tensor([0.5, -1.0, 2.0]))


def test_classifier_free_matches_two_separate_forwards() -> None:
    toy = Toy()
    got = classifier_free(toy, COND, 2.5)(Z, T, X_PREV)
    assert toy.rows == [6]
    c, u = toy(Z, T, X_PREV, COND), toy(Z, T, X_PREV, Cond(torch.zeros(3)))
    torch.testing.assert_close(got.x, (u.x + 2.5 * (c.x - u.x)).float())
    torch.testing.assert_close(got.v, (u.v + 2.5 * (c.v - u.v)).float())
    assert got.x.dtype == got.v.dtype == torch.float32


def test_classifier_free_scale_one_is_a_single_b_row_forward() -> None:
    toy = Toy()
    got = classifier_free(toy, COND, 1.0)(Z, T, X_PREV)
    assert toy.rows == [3]
    torch.testing.assert_close(got.x, toy(Z, T, X_PREV, COND).x)


def test_classifier_free_one_forward_per_step_in_a_rollout() -> None:
    toy = Toy()
    out = integrate(
        classifier_free(toy, COND, 2.0),
        Z,
        uniform(4),
        method="sde",
        churn=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert toy.rows == [6, 6, 6, 6] and out.nfe == 4 and out.z.shape == Z.shape


def test_conditional_passes_cond_through() -> None:
    toy = Toy()
    torch.testing.assert_close(conditional(toy, COND)(Z, T, X_PREV).v, toy(Z, T, X_PREV, COND).v)


def test_self_conditioning_matches_two_separate_forwards() -> None:
    toy = Toy()
    got = self_conditioning(toy, COND, 3.0)(Z, T, X_PREV)
    assert toy.rows == [6]
    c, u = toy(Z, T, X_PREV, COND), toy(Z, T, torch.zeros_like(X_PREV), COND)
    torch.testing.assert_close(got.x, (u.x + 3.0 * (c.x - u.x)).float())
    torch.testing.assert_close(got.v, (u.v + 3.0 * (c.v - u.v)).float())


@pytest.mark.parametrize(("scale", "zeroed"), [(1.0, False), (0.0, True)])
def test_self_conditioning_short_circuits(scale: float, zeroed: bool) -> None:
    toy = Toy()
    got = self_conditioning(toy, COND, scale)(Z, T, X_PREV)
    assert toy.rows == [3]
    expected = toy(Z, T, torch.zeros_like(X_PREV) if zeroed else X_PREV, COND)
    torch.testing.assert_close(got.x.float(), expected.x.float())


def test_self_conditioning_without_condition() -> None:
    def denoise(z: Tensor, t: Tensor, x_prev: Tensor, cond: None) -> Prediction:
        assert cond is None
        return Prediction(x=z + x_prev, v=x_prev)

    got = self_conditioning(denoise, None, 2.0)(Z, T, X_PREV)
    torch.testing.assert_close(got.v, 2.0 * X_PREV)
