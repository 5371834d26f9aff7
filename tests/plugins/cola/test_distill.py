"""Cola's progressive distillation of the per-block transport (plugins/cdlm_cola/distill.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cdlm
from cdlm.errors import RecipeError
from cdlm.interfaces import Method, TokenBatch
from cdlm.training.distill import Teacher
from cdlm_cola.components import ColaCond, ColaGenerationState
from cdlm_cola.config import ColaDistillConfig, ColaSampleConfig
from cdlm_cola.distill import ColaDistillObjective, block_velocity, guided_transport
from test_cli import cdlm_cli

SINGLE = ["stages=[]", "model.stage=joint"]  # cola-tiny's joint stage, random weights
SHORT = ["data.max_rows=40", "train.batch_size=4", "data.seq_len=16", "train.log_every=1"]


def tiny() -> Method:
    method = cdlm.build(cdlm.load_recipe("cola-tiny", SINGLE))
    method.modules().eval()
    return method


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_every_block_moves_as_generation_moves_it(guidance: float) -> None:
    """Block b of the 2L transport equals generation's guided prediction for block b after committing blocks < b."""
    method, gen = tiny(), torch.Generator().manual_seed(0)
    pipeline, denoiser, schedule = method.pipeline, method.denoiser, method.schedule
    bs, C = denoiser.dit.config.block_size, denoiser.dit.config.txt_in_channels
    x, z = torch.randn(2, 3 * bs, C, generator=gen), torch.randn(2, 3 * bs, C, generator=gen)  # 3 blocks
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        every = guided_transport(denoiser.dit, schedule, x, guidance)(z, t, torch.zeros_like(z))
        for b in range(3):
            block = slice(b * bs, (b + 1) * bs)
            state = ColaGenerationState(denoiser, method.discretizer, [row[: b * bs] for row in x])
            cond = state.cond()  # block 0: no history, so generation leaves it unguided
            settings = ColaSampleConfig(guidance=guidance)
            one = pipeline.predictor(cond, settings)(z[:, block], t, torch.zeros_like(z[:, block]))
            torch.testing.assert_close(every.v[:, block], one.v, atol=1e-5, rtol=0)
            torch.testing.assert_close(every.x[:, block], one.x, atol=1e-5, rtol=0)


def test_without_history_each_block_is_a_fresh_sequence() -> None:
    method, gen = tiny(), torch.Generator().manual_seed(1)
    denoiser, schedule = method.denoiser, method.schedule
    bs, C = denoiser.dit.config.block_size, denoiser.dit.config.txt_in_channels
    x, z = torch.randn(1, 2 * bs, C, generator=gen), torch.randn(1, 2 * bs, C, generator=gen)
    t = torch.tensor([0.4])
    with torch.no_grad():
        both = block_velocity(denoiser.dit, schedule, x, z, t, history=False)
        alone = [denoiser(z[:, b * bs : (b + 1) * bs], t, ColaCond(cached=(None,))) for b in range(2)]
        with_history = block_velocity(denoiser.dit, schedule, x, z, t, history=True)
    torch.testing.assert_close(both, torch.cat(alone, dim=1), atol=1e-5, rtol=0)
    assert not torch.allclose(both[:, bs:], with_history[:, bs:], atol=1e-3)  # block 1 does read block 0


def objective(method: Method, teacher: Method, **settings: float) -> ColaDistillObjective:
    config = ColaDistillConfig(**settings)
    return ColaDistillObjective(
        method.embedder, method.denoiser, method.schedule, Teacher(config, teacher.denoiser), config
    )


def batch(rows: int = 2, length: int = 16) -> TokenBatch:
    ids = torch.randint(3, 300, (rows, length), generator=torch.Generator().manual_seed(2))
    return TokenBatch(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros_like(ids, dtype=torch.bool))


def test_student_equal_to_an_unguided_one_substep_teacher_has_zero_loss() -> None:
    student, teacher = tiny(), tiny()  # same seed, same weights
    same = objective(student, teacher, steps=4, teacher_steps=1)(batch(), torch.Generator().manual_seed(3))
    assert same.loss.item() == 0.0
    folded = objective(student, teacher, steps=4, teacher_steps=1, guidance=3.0)
    assert folded(batch(), torch.Generator().manual_seed(3)).loss.item() > 0  # the guided target differs


def test_a_step_trains_the_dit_only_and_is_reproducible() -> None:
    student, teacher = tiny(), tiny()
    pd = objective(student, teacher, steps=4, teacher_steps=4, guidance=3.0)
    out = pd(batch(), torch.Generator().manual_seed(4))
    out.loss.backward()
    dit, vae = student.denoiser.dit, student.embedder.vae
    assert out.loss.item() > 0 and all(p.grad is not None for p in dit.parameters())
    assert all(p.grad is None for p in vae.parameters())  # frozen: encoded without gradients
    assert all(p.grad is None for p in teacher.denoiser.parameters())
    assert pd(batch(), torch.Generator().manual_seed(4)).loss.item() == pytest.approx(out.loss.item())
    assert cdlm.build(cdlm.load_recipe("cola-tiny-pd", ["stages=[]"])).trainable.keys() == {"dit"}


def test_rows_of_partial_blocks_are_refused() -> None:
    student, teacher = tiny(), tiny()
    with pytest.raises(ValueError, match="data.seq_len=14: Cola distillation needs rows of whole blocks"):
        objective(student, teacher)(batch(length=14), torch.Generator())


def test_a_folded_student_must_sample_unguided() -> None:
    with pytest.raises(RecipeError, match="would guide twice; set sample.guidance=1"):
        cdlm.load_recipe("cola-tiny-pd", ["stages=[]", "sample.guidance=3"])


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("cola-teacher") / "cola"
    cdlm.train(cdlm.load_recipe("cola-tiny", [*SINGLE, *SHORT, "train.steps=2", "train.save_every=2"]), run)
    return run


def test_cdlm_distill_trains_cola_rounds_and_samples_the_student(teacher_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "pd"
    sets = [a for s in [*SHORT, "train.steps=2", "train.save_every=2"] for a in ("--set", s)]
    done = cdlm_cli("distill", "--teacher", str(teacher_run), "--recipe", "cola-tiny-pd", "--rounds", "2", *sets,
                    "-o", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    second = out / "round2_4step"
    teacher = load_file(next((teacher_run / "checkpoints").iterdir()) / "ema.safetensors")
    student = load_file(next((second / "checkpoints").iterdir()) / "model.safetensors")
    assert all(torch.equal(student[k], v) for k, v in teacher.items() if k.startswith("vae."))  # VAE frozen
    assert any(not torch.equal(student[k], v) for k, v in teacher.items() if k.startswith("dit."))  # DiT trained
    loaded = cdlm.load_pretrained(second)
    assert (loaded.config.model.distill.steps, loaded.config.sample.steps) == (4, 4)
    assert (loaded.config.model.distill.guidance, loaded.config.sample.guidance) == (3.0, 1.0)
    samples = cdlm.sample(loaded, prompts=["The return value"], overrides=["sample.max_new_tokens=8"])
    assert len(samples) == 1
