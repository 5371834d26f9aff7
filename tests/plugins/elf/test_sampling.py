"""ELF generation against the reference fixtures (spec §4–5, §12): replayed grid and z₀, trajectory and ids."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from cdlm.interfaces import GenerateRequest
from cdlm.pipeline import rollout, time_grid
from cdlm.sampling import grids
from cdlm.sampling.types import StepInfo
from cdlm_elf.conditioning import ElfCond
from cdlm_elf.config import ElfConfig, ElfSampleConfig, EncoderConfig
from cdlm_elf.embedder import T5Embedder
from cdlm_elf.model import ElfDecoder, ElfDenoiser, ElfTransformer
from cdlm_elf.pipeline import ElfPipeline, decode, elf_denoise_fn, guided, postprocess
from cdlm_elf.schedule import ElfSchedule
from cdlm_elf.state_dict import ElfStateDictAdapter
from conftest import shared_path
from elf_fixture import fixture_config
from parity import RANDN_ATOL, assert_ulps

ATOL = 1e-5


@pytest.fixture(scope="module")
def parts() -> tuple[ElfConfig, ElfDenoiser, ElfDecoder, ElfSchedule]:
    cfg = fixture_config(encoder=EncoderConfig(pretrained=None, vocab_size=528, d_model=64))
    network = ElfTransformer(cfg)
    ours = ElfStateDictAdapter(cfg).from_official(load_file(shared_path("fixtures", "elf", "model.safetensors")))
    network.load_state_dict({k.removeprefix("network."): v for k, v in ours.items()}, strict=True)
    network.eval()
    return cfg, ElfDenoiser(network), ElfDecoder(network), ElfSchedule(cfg)


def load_case(name: str) -> tuple[dict[str, Tensor], dict]:
    base = shared_path("fixtures", "elf")
    return load_file(base / f"{name}.safetensors"), json.loads((base / f"{name}.json").read_text())


def max_err(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


def replay(parts, case: dict[str, Tensor], cond: ElfCond, settings: ElfSampleConfig, seed: int):
    """Check the recorded draws against our generator order, then roll out and decode."""
    cfg, denoiser, decoder, schedule = parts
    # the reference draws the grid from the global RNG seeded with `seed`: the same stream as a fresh generator.
    # σ = 1/(1+e^−x) in fp32: libms round it ≤ 2 ulp apart (torch here ≠ the correctly rounded σ at 4 of 15 points)
    assert_ulps(grids.logit_normal(settings.steps, torch.Generator().manual_seed(seed)), case["t_steps"], 2)
    generator = torch.Generator().manual_seed(seed)
    z0 = cfg.noise_scale * torch.randn(case["z_init"].shape, generator=generator)
    torch.testing.assert_close(z0, case["z_init"], rtol=0, atol=cfg.noise_scale * RANDN_ATOL)  # Box–Muller: parity.py
    steps: list[StepInfo] = []
    out = rollout(
        guided(elf_denoise_fn(denoiser, schedule), cond, settings.guidance),
        case["z_init"],
        case["t_steps"],
        settings,
        noise_scale=cfg.noise_scale,
        generator=generator,
        constrain=cond.restore,
        on_step=steps.append,
    )
    trajectory = torch.stack([s.z for s in steps])
    ids = decode(decoder, out.z, cond, settings, generator)
    return out, trajectory, ids


def test_sde_rollout_matches_reference(parts) -> None:
    case, meta = load_case("sample_sde")
    settings = ElfSampleConfig(sampler="sde", steps=16, churn=1.5, self_cond_scale=3.0, guidance=1.0)
    noise = torch.Generator().manual_seed(3)
    torch.randn(case["z_init"].shape, generator=noise)  # z₀
    for i in range(2, 17):  # then one ε per SDE step, in order
        draw = torch.randn(case["z_init"].shape, generator=noise)
        torch.testing.assert_close(draw, case[f"randoms/{i:03d}_randn"], rtol=0, atol=RANDN_ATOL)  # see parity.py
    cond = ElfCond(torch.full((2,), 3.0))
    out, trajectory, ids = replay(parts, case, cond, settings, seed=3)
    errors = {"trajectory": max_err(trajectory, case["trajectory/z"]), "latent": max_err(out.z, case["latent_final"])}
    print("sample_sde max |Δ|", errors)
    assert max(errors.values()) < ATOL
    assert out.nfe == 16 and len(meta["trajectory/t"]) == trajectory.shape[0]
    assert torch.equal(ids, case["predicted_ids_argmax"])
    final = postprocess(ids, None, eos_id=1, pad_id=0)
    assert final == case["predicted_ids_final"].tolist()


def test_ode_cfg_conditional_rollout_matches_reference(parts) -> None:
    case, _ = load_case("sample_ode_cond")
    settings = ElfSampleConfig(sampler="euler", steps=16, guidance=2.0, self_cond_scale=2.0)
    mask = case["cond_seq_mask"].bool()
    cond = ElfCond(torch.full((3,), 2.0), case["cond_seq"], mask)
    out, trajectory, ids = replay(parts, case, cond, settings, seed=4)
    errors = {"trajectory": max_err(trajectory, case["trajectory/z"]), "latent": max_err(out.z, case["latent_final"])}
    print("sample_ode_cond max |Δ|", errors)
    assert max(errors.values()) < ATOL
    assert out.nfe == 16
    assert torch.equal(ids, case["predicted_ids_argmax"])
    lengths = mask.sum(-1).tolist()
    width = case["predicted_ids_final"].shape[1]
    shifted = torch.stack([ids[i, n : n + width] for i, n in enumerate(lengths)])
    assert torch.equal(shifted, case["predicted_ids_shifted"])
    final = [row[:width] for row in postprocess(ids, lengths, eos_id=1, pad_id=0)]
    assert final == case["predicted_ids_final"].tolist()


def test_pipeline_encodes_sources_as_the_reference_condition(parts) -> None:
    case, _ = load_case("sample_ode_cond")
    cfg = fixture_config(encoder=EncoderConfig(pretrained=str(shared_path("fixtures", "elf", "t5_encoder"))))
    _, denoiser, decoder, schedule = parts
    pipeline = ElfPipeline(cfg, denoiser, decoder, schedule, T5Embedder(cfg))
    mask = case["cond_seq_mask"].bool()
    sources = [row[m].tolist() for row, m in zip(case["cond_input_ids"], mask, strict=True)]
    cond = pipeline.condition(3, sources, ElfSampleConfig(self_cond_scale=2.0))
    assert torch.equal(cond.mask, mask)
    err = max_err(cond.values[mask], case["cond_seq"][mask])
    print("condition latents max |Δ|", err)
    assert err < ATOL
    torch.testing.assert_close(cond.sc_scale, torch.full((3,), 2.0))

    settings = ElfSampleConfig(num_samples=3, batch_size=2, sampler="euler", steps=4, guidance=2.0, self_cond_scale=2.0)
    output = pipeline(GenerateRequest(3, sources, settings), torch.Generator().manual_seed(0))
    assert output.nfe == 2 * (4 + 1)
    assert [len(row) for row in output.ids] == [32 - len(s) for s in sources]


def test_pipeline_draws_grid_then_z0_then_noise(parts) -> None:
    cfg, denoiser, decoder, schedule = parts
    pipeline = ElfPipeline(cfg, denoiser, decoder, schedule, embedder=None)  # unconditional: no sources to encode
    settings = ElfSampleConfig(num_samples=3, batch_size=2, sampler="sde", steps=5, churn=1.5, self_cond_scale=3.0)
    output = pipeline(GenerateRequest(3, None, settings), torch.Generator().manual_seed(11))

    generator = torch.Generator().manual_seed(11)
    expected: list[list[int]] = []
    for size in (2, 1):
        cond = ElfCond(torch.full((size,), 3.0))
        grid = time_grid(settings, generator)
        z0 = cfg.noise_scale * torch.randn(size, cfg.max_length, cfg.latent_dim, generator=generator)
        out = rollout(
            guided(elf_denoise_fn(denoiser, schedule), cond, 1.0),
            z0,
            grid,
            settings,
            noise_scale=cfg.noise_scale,
            generator=generator,
            constrain=cond.restore,
        )
        expected += postprocess(decode(decoder, out.z, cond, settings, generator), None, eos_id=1, pad_id=0)
    assert output.ids == expected and output.nfe == 2 * (5 + 1)
    assert all(len(row) == cfg.max_length for row in output.ids)


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ([[5, 6]], "got 1 prompts for num_samples=2"),
        ([[5], list(range(2, 34))], r"prompts \[1\] have ≥ model.max_length=32"),
    ],
)
def test_pipeline_rejects_bad_prompts(parts, prompts: list[list[int]], message: str) -> None:
    cfg, denoiser, decoder, schedule = parts
    pipeline = ElfPipeline(cfg, denoiser, decoder, schedule, embedder=None)
    with pytest.raises(ValueError, match=message):
        pipeline(GenerateRequest(2, prompts, ElfSampleConfig(num_samples=2)), torch.Generator())


@pytest.mark.parametrize("time_schedule", ["logit_normal", "uniform"])
def test_schedule_sample_t_and_predict(time_schedule: str) -> None:
    cfg = ElfConfig(time_schedule=time_schedule, p_mean=-1.5, p_std=0.8, noise_scale=2.0, t_eps=0.05)
    schedule = ElfSchedule(cfg)
    t = schedule.sample_t(4, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    logit_normal = torch.sigmoid(torch.randn(4, generator=gen) * 0.8 - 1.5)
    expected = (
        logit_normal if time_schedule == "logit_normal" else torch.rand(4, generator=torch.Generator().manual_seed(0))
    )
    torch.testing.assert_close(t, expected, rtol=0, atol=0)
    x, eps = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    times = torch.tensor([0.3, 0.99])
    z = schedule.interpolate(x, eps, times)
    torch.testing.assert_close(z, times[:, None, None] * x + (1 - times[:, None, None]) * 2.0 * eps)
    pred = schedule.predict(x.double(), z, times)
    assert pred.x.dtype == pred.v.dtype == torch.float32
    torch.testing.assert_close(pred.v, (x - z) / torch.tensor([0.7, 0.05])[:, None, None])


@pytest.mark.parametrize(
    ("grid", "expected"),
    [
        ({"grid": "uniform"}, lambda s: grids.uniform(s.steps)),
        ({"grid": "shifted", "grid_shift": 3.0}, lambda s: grids.shifted(s.steps, 3.0)),
        ({"grid": "logit_normal_quantiles"}, lambda s: grids.logit_normal_quantiles(s.steps, -1.5, 0.8)),
    ],
)
def test_time_grid_follows_the_settings(grid: dict, expected) -> None:
    settings = ElfSampleConfig(steps=8, **grid)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(time_grid(settings, generator), expected(settings))
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())  # deterministic: no draw
