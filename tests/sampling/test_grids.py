import pytest
import torch

from cdlm.errors import CdlmError, DataError
from cdlm.sampling import grids
from cdlm.sampling.grids import check_grid, logit_normal, logit_normal_times, uniform


def test_uniform_is_linspace() -> None:
    torch.testing.assert_close(uniform(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    assert uniform(1).tolist() == [0.0, 1.0]


def test_logit_normal_matches_formula_and_is_valid() -> None:
    grid = logit_normal(6, torch.Generator().manual_seed(0), mean=-1.5, std=0.8)
    draws = torch.randn(5, generator=torch.Generator().manual_seed(0))
    expected = torch.cat([torch.zeros(1), torch.sigmoid(draws * 0.8 - 1.5).sort().values, torch.ones(1)])
    torch.testing.assert_close(grid, expected, rtol=0, atol=0)
    assert grid.dtype == torch.float32 and grid.device.type == "cpu"
    check_grid(grid)


def test_logit_normal_one_step_draws_nothing() -> None:
    gen = torch.Generator().manual_seed(5)
    assert logit_normal(1, gen).tolist() == [0.0, 1.0]
    assert torch.equal(torch.randn(3, generator=gen), torch.randn(3, generator=torch.Generator().manual_seed(5)))


def test_logit_normal_times_mean_location() -> None:
    t = logit_normal_times(20000, torch.Generator().manual_seed(1), mean=-1.5, std=0.8)
    assert abs(torch.logit(t).mean().item() + 1.5) < 0.03 and abs(torch.logit(t).std().item() - 0.8) < 0.03


@pytest.mark.parametrize("n", [0, -2, 1.5, True])
def test_bad_step_counts(n: object) -> None:
    with pytest.raises(CdlmError, match="n ≥ 1"):
        uniform(n)  # type: ignore[arg-type]


def test_check_grid_names_non_increasing_entries() -> None:
    with pytest.raises(ValueError, match=r"grid\[1\] = 0.5 ≥ grid\[2\] = 0.5"):
        check_grid(torch.tensor([0.0, 0.5, 0.5, 1.0]))
    with pytest.raises(ValueError, match=r"grid\[2\] = 0.7 ≥ grid\[3\] = 0.2"):
        check_grid(torch.tensor([0.0, 0.4, 0.7, 0.2, 1.0]))


def test_check_grid_names_out_of_range_entries() -> None:
    with pytest.raises(ValueError, match=r"within \[0, 1\]; found grid\[0\] = -0.1, grid\[2\] = 1.5"):
        check_grid(torch.tensor([-0.1, 0.5, 1.5]))
    with pytest.raises(ValueError, match="nan"):
        check_grid(torch.tensor([0.0, float("nan"), 1.0]))


@pytest.mark.parametrize("grid", [torch.tensor([0.5]), torch.zeros(2, 2, 2), torch.zeros(3, 1), torch.tensor([0, 1])])
def test_check_grid_shape_and_dtype(grid: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"float tensor \(n \+ 1,\) or \(B, n \+ 1\) of at least 2 times"):
        check_grid(grid)


def test_check_grid_per_row_names_row_and_column() -> None:
    check_grid(torch.tensor([[0.1, 0.2, 0.4], [0.5, 0.6, 1.0]]))
    with pytest.raises(ValueError, match=r"grid\[1, 1\] = 0.6 ≥ grid\[1, 2\] = 0.6"):
        check_grid(torch.tensor([[0.1, 0.2, 0.4], [0.5, 0.6, 0.6]]))


def test_shifted_grid_warps_toward_noise() -> None:
    assert torch.equal(grids.shifted(8, 1.0), grids.uniform(8))
    g = grids.shifted(4, 3.0)
    assert g[0] == 0 and g[-1] == 1 and bool((g[1:] > g[:-1]).all())
    # σ = 0.75 → 3·0.75 / (1 + 2·0.75) = 0.9, so t = 0.1: finer steps near the noise end
    torch.testing.assert_close(g[1], torch.tensor(0.1), atol=1e-7, rtol=0)
    assert bool((grids.shifted(4, 0.5)[1:-1] > grids.uniform(4)[1:-1]).all())
    with pytest.raises(DataError, match="expected a positive shift, got 0"):
        grids.shifted(4, 0.0)


def test_logit_normal_quantile_grid_is_the_quantiles() -> None:
    g = grids.logit_normal_quantiles(4, mean=0.0, std=1.0)
    expected = torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor([0.25, 0.5, 0.75])))
    torch.testing.assert_close(g[1:-1], expected, atol=1e-6, rtol=0)
    assert g[0] == 0 and g[-1] == 1 and g[2] == 0.5
    assert torch.equal(grids.logit_normal_quantiles(1), torch.tensor([0.0, 1.0]))
