"""Progressive distillation: the reference ``distill_train_step`` replayed from its recorded draws (fixtures/elf
``pd_step``), and the ELF distillation objective's draw order."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import cdlm_elf.distill
from cdlm.interfaces import TokenBatch
from cdlm.training.distill import DistillConfig, Teacher
from cdlm_elf.config import ElfConfig, EncoderConfig
from cdlm_elf.distill import ElfDistillDraws, ElfDistillObjective
from cdlm_elf.embedder import T5Embedder
from cdlm_elf.model import ElfDenoiser, ElfTransformer
from cdlm_elf.schedule import ElfSchedule
from cdlm_elf.state_dict import ElfStateDictAdapter
from conftest import shared_path
from elf_fixture import objective_config


def _network(cfg: ElfConfig, official: dict[str, Tensor]) -> ElfTransformer:
    model = nn.ModuleDict({"network": ElfTransformer(cfg)})  # keys `network.…`, as the Method
    model.load_state_dict(ElfStateDictAdapter(cfg).from_official(official))
    return model["network"]


class _PdStep:
    """The recorded reference PD step, with our objective on the fixture teacher and student."""

    def __init__(self) -> None:
        fixtures = shared_path("fixtures", "elf")
        self.meta = json.loads((fixtures / "pd_step.json").read_text())
        self.data = d = load_file(fixtures / "pd_step.safetensors")
        train = self.meta["train_config"]
        settings = DistillConfig(steps=round(1 / train["pd_step_size"]), teacher_steps=train["pd_teacher_steps"])
        self.cfg = cfg = objective_config(train, distill=settings)
        teacher = _network(cfg, load_file(fixtures / "model.safetensors")).eval()
        ckpt = torch.load(fixtures / "ckpt" / "checkpoint_1", map_location="cpu", weights_only=True)
        self.student = _network(cfg, ckpt["params"])
        self.objective = ElfDistillObjective(
            cfg,
            T5Embedder(cfg),
            self.student,
            ElfSchedule(cfg),
            Teacher(settings, ElfDenoiser(teacher)),
            pad_token=train["pad_token"],
        )
        self.batch = TokenBatch(
            ids=d["batch/input_ids"], mask=d["batch/attention_mask"].bool(), cond_mask=d["batch/cond_seq_mask"].bool()
        )
        times = lambda logits: torch.sigmoid(logits * cfg.p_std + cfg.p_mean)  # noqa: E731  logit-normal, spec §3.2
        n = settings.teacher_steps
        assert [e.split(":")[0] for e in self.meta["random_draw_order"]][-1] == "007_randn"  # 8 draws, spec §8
        self.draws = ElfDistillDraws(
            dec=d["randoms/000_bernoulli"],
            u=times(d["randoms/001_randn"]),
            sc_scale=d["randoms/002_rand"],
            lam=d["randoms/003_randn"],
            eps_dec=d["randoms/004_randn"],
            eps=d["randoms/005_randn"],
            sc_coin=d["randoms/006_bernoulli"],
            inner=times(d["randoms/007_randn"]).view(-1, n - 1),
        )


@pytest.fixture(scope="module")
def pd_step() -> _PdStep:
    return _PdStep()


def test_pd_step_matches_reference(pd_step: _PdStep, monkeypatch: pytest.MonkeyPatch) -> None:
    d, C = pd_step.data, pd_step.cfg.latent_dim
    seen: dict[str, Tensor] = {}
    target_fn = cdlm_elf.distill.teacher_target

    def recorded_target(predict, z, grid, x_init, **kwargs):  # noqa: ANN001, ANN202
        seen["grid"], seen["x_init"] = grid, x_init
        seen["target"] = target_fn(predict, z, grid, x_init, **kwargs)
        return seen["target"]

    def recorded_forward(module: nn.Module, args: tuple, output: tuple) -> None:
        seen["input"], (seen["x_pred"], seen["logits"]) = args[0], output

    monkeypatch.setattr(cdlm_elf.distill, "teacher_target", recorded_target)
    hook = pd_step.student.register_forward_hook(recorded_forward)
    try:
        out = pd_step.objective.loss(pd_step.batch, pd_step.draws)
    finally:
        hook.remove()

    pd = (pd_step.draws.dec == 0).nonzero().squeeze(1)  # rows [0, 1]; row 2 is a decoder (CE) row
    dec = pd_step.draws.dec.nonzero().squeeze(1)
    assert pd.tolist() == [0, 1] and dec.tolist() == [2]
    ref_in = "teacher_pd_target_in/"
    torch.testing.assert_close(seen["grid"], d[ref_in + "sub_step_times"][pd], atol=1e-6, rtol=0)
    torch.testing.assert_close(seen["input"][..., C:], d[ref_in + "sc_half"], atol=1e-5, rtol=0)
    torch.testing.assert_close(seen["input"][pd, :, :C], d[ref_in + "z_t_s"][pd], atol=1e-5, rtol=0)
    # the teacher's implied x-target of the PD rows (the decoder row's target never reaches the loss)
    torch.testing.assert_close(seen["target"], d["target_pd"][pd], atol=1e-5, rtol=0)
    torch.testing.assert_close(seen["x_pred"], d["student_out/x_pred"], atol=1e-5, rtol=0)
    torch.testing.assert_close(seen["logits"], d["student_out/decoder_logits"][dec], atol=1e-5, rtol=0)
    ref = pd_step.meta["metrics"]
    assert out.loss.item() == pytest.approx(ref["loss"], rel=1e-6, abs=1e-6)
    assert out.metrics["ce_loss"] == pytest.approx(ref["ce_loss"], rel=1e-6)
    assert out.metrics["l2_loss"] == pytest.approx(ref["l2_loss"], rel=1e-5, abs=1e-9)
    out.loss.backward()  # the loss reaches the student only: the teacher stays frozen
    assert all(p.grad is not None for p in pd_step.student.parameters() if p.requires_grad)


def _tiny(teacher_steps: int, self_cond_prob: float) -> tuple[ElfDistillObjective, TokenBatch]:
    enc = EncoderConfig(pretrained=None, vocab_size=40, d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    settings = DistillConfig(steps=4, teacher_steps=teacher_steps)
    cfg = ElfConfig(
        max_length=8, latent_dim=16, hidden_size=16, depth=1, num_heads=2, bottleneck_dim=8, vocab_size=32,
        encoder=enc, decoder_prob=0.5, self_cond_prob=self_cond_prob, distill=settings,
    )  # fmt: skip
    teacher = ElfDenoiser(ElfTransformer(cfg, generator=torch.Generator().manual_seed(1)))
    student = ElfTransformer(cfg, generator=torch.Generator().manual_seed(2))
    objective = ElfDistillObjective(cfg, T5Embedder(cfg), student, ElfSchedule(cfg), Teacher(settings, teacher))
    ids = torch.randint(2, 32, (4, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.arange(8)[None, :] < torch.tensor([[8], [6], [8], [7]])
    return objective, TokenBatch(ids, mask, torch.zeros_like(mask))


@pytest.mark.parametrize(("teacher_steps", "self_cond_prob"), [(3, 0.5), (1, 0.0)])
def test_draw_order_and_call_equals_replay(teacher_steps: int, self_cond_prob: float) -> None:
    objective, batch = _tiny(teacher_steps, self_cond_prob)
    draws = objective.draw(batch, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    dec = torch.bernoulli(torch.full((4,), 0.5), generator=gen)
    u = torch.sigmoid(torch.randn(4, generator=gen) * 0.8 - 1.5)
    assert torch.equal(draws.dec, dec) and torch.equal(draws.u, u)
    assert torch.equal(draws.sc_scale, torch.rand(4, generator=gen))
    for _ in range(3):  # λ, ε_d, ε
        torch.randn(1, generator=gen)
    assert (draws.sc_coin is None) == (self_cond_prob == 0) and draws.inner.shape == (4, teacher_steps - 1)
    called = objective(batch, torch.Generator().manual_seed(7))
    replayed = objective.loss(batch, draws)
    assert torch.equal(called.loss, replayed.loss) and called.metrics == replayed.metrics
    assert torch.isfinite(called.loss)


def test_student_equal_to_teacher_on_one_substep_has_zero_pd_loss() -> None:
    """With one teacher sub-step the target is the teacher's x̂ itself: a student copy of it has PD loss 0."""
    objective, batch = _tiny(1, 0.5)
    teacher = objective.teacher.denoiser(torch.device("cpu"))
    objective.network.load_state_dict(teacher.network.state_dict())  # type: ignore[attr-defined]
    draws = objective.draw(batch, torch.Generator().manual_seed(11))
    out = objective.loss(batch, draws)
    assert out.metrics["l2_loss"] == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("kind", [0.0, 1.0])
def test_batch_of_one_row_kind(kind: float) -> None:
    """All PD rows (no CE term) or all decoder rows (no teacher call): the loss is the other branch's mean."""
    objective, batch = _tiny(2, 0.5)
    draws = objective.draw(batch, torch.Generator().manual_seed(3))
    out = objective.loss(batch, ElfDistillDraws(**{**draws.__dict__, "dec": torch.full((4,), kind)}))
    assert out.loss.item() == pytest.approx(out.metrics["ce_loss" if kind else "l2_loss"], rel=1e-6)
