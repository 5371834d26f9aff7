"""Progressive distillation of Cola's per-block transport, with the teacher's guidance folded into the student.

Generation moves one block at a time from noise to data, reading the clean blocks before it (spec §5, §6.1). The
student (the DiT; the VAE is frozen) learns to cover a span Δ = 1/``steps`` of that transport in one evaluation,
as the core's progressive distillation (:mod:`cdlm.training.distill`) does for a whole sequence:

* the frozen VAE encodes each row into scaled latents x (B, n, C) (posterior mode: what generation commits as
  history); each row draws a span ``t_s``, ``t_t = t_s + Δ`` (core time, :func:`student_times` of a training
  time of the schedule) and noise ε, and all its blocks start at ``z = interpolate(x, ε, t_s)``;
* every block moves at once in the 2L layout (:func:`block_velocity`): block b's noisy latents read the clean
  blocks before b and themselves, the view generation gives block b after committing blocks ``< b``;
* the frozen teacher integrates the span in ``teacher_steps`` Euler sub-steps (the core's
  :func:`teacher_target` on the shared solver), each sub-step guided as generation guides:
  ``v_u + w·(v_c − v_u)`` with v_c the 2L forward and v_u each block alone (a fresh one-block sequence, the
  null rows of :meth:`~cdlm_cola.components.ColaCond.null`), ``w = model.distill.guidance``; the first block
  reads no history, so both branches agree on it, as generation leaves it unguided;
* the student's conditional x̂ at ``(z, t_s)`` regresses the teacher's implied x-target (x-space MSE, per-row
  means over real latents). It then samples unguided (``sample.guidance: 1``) in ``steps`` Euler steps a block.

Prompt tails repainted into a first block (spec §6.1 step 5) are not drawn here: every latent of a row is noisy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cdlm.errors import DataError
from cdlm.interfaces import LossOutput, Objective, TokenBatch
from cdlm.sampling.guidance import combine
from cdlm.sampling.types import PredictFn, Prediction
from cdlm.training.distill import Teacher, draw_spans, per_example_mean, teacher_target
from cdlm_cola import layout
from cdlm_cola.components import ColaDenoiser, ColaEmbedder
from cdlm_cola.config import ColaDistillConfig
from cdlm_cola.dit import ColaDiT
from cdlm_cola.schedule import ColaSchedule


def block_velocity(dit: ColaDiT, schedule: ColaSchedule, x: Tensor, z: Tensor, t: Tensor, *, history: bool) -> Tensor:
    """Return the DiT's raw output (B, n, C) for every block of z at once: Cola velocity, as generation sees it.

    Args:
        dit: the block-causal DiT.
        schedule: gives the DiT timestep of a core time.
        x: (B, n, C) clean latents, the history (read when ``history``).
        z: (B, n, C) noisy latents, n a multiple of the DiT's block size.
        t: (B,) core times of the rows (every block of a row at its row's time).
        history: True: block b reads the clean blocks ``< b`` (2L layout, spec §4.3); False: each block alone.
    """
    B, n, C = z.shape
    bs, device = dit.config.block_size, z.device
    timestep = schedule.model_time(t)[:, None].expand(B, n)  # (B, n)
    if history:
        txt = torch.cat([x, z], dim=1).flatten(0, 1)  # (B·2n, C): per row [clean | noisy]
        steps = torch.cat([torch.zeros_like(timestep), timestep], dim=1).flatten()  # (B·2n,) clean at t = data
        positions = layout.twol_positions([n] * B, device)  # (B·2n,)
        mask = layout.twol_block_causal_mask([n], bs, txt.dtype, device)  # (1, 1, 2n, 2n): rows attend as a batch
        out = dit(txt, [2 * n] * B, [2 * n] * B, steps, k_positions=positions, q_positions=positions, mask=mask)
        return out.unflatten(0, (B, 2 * n))[:, n:]  # (B, n, C)
    rows = B * n // bs  # one fresh sequence per block, positions 0..bs−1
    positions = layout.k_positions([bs] * rows, device)  # (B·n,)
    mask = torch.zeros(1, 1, bs, bs, dtype=z.dtype, device=device)  # a block attends to itself only
    out = dit(z.flatten(0, 1), [bs] * rows, [bs] * rows, timestep.flatten(), k_positions=positions,
              q_positions=positions, mask=mask)  # fmt: skip
    return out.view(B, n, C)


def guided_transport(dit: ColaDiT, schedule: ColaSchedule, x: Tensor, guidance: float) -> PredictFn:
    """Return the PredictFn of every block's transport given the clean history x, under CFG ``guidance``."""

    def predict(z: Tensor, t: Tensor, x_prev: Tensor) -> Prediction:
        cond = schedule.predict(block_velocity(dit, schedule, x, z, t, history=True), z, t)
        if guidance == 1.0:
            return cond
        null = schedule.predict(block_velocity(dit, schedule, x, z, t, history=False), z, t)
        both = Prediction(x=torch.cat([cond.x, null.x]), v=torch.cat([cond.v, null.v]))  # (2B, n, C)
        return combine(both, guidance)

    return predict


class ColaDistillObjective(Objective):
    """Progressive distillation of the DiT's per-block transport (module docstring); the VAE stays frozen.

    Draws as the core's :func:`~cdlm.training.distill.draw_spans` does.

    Args:
        embedder: the VAE encoder (posterior mode, scaled).
        denoiser: the student DiT in core time.
        schedule: Cola's schedule, shared by student and teacher.
        teacher: the frozen teacher (a Cola run; its DiT is read).
        settings: the round's ``model.distill`` section.
    """

    def __init__(
        self,
        embedder: ColaEmbedder,
        denoiser: ColaDenoiser,
        schedule: ColaSchedule,
        teacher: Teacher,
        settings: ColaDistillConfig,
    ) -> None:
        self.embedder, self.denoiser, self.schedule = embedder, denoiser, schedule
        self.teacher, self.settings = teacher, settings

    def __call__(self, batch: TokenBatch, generator: torch.Generator) -> LossOutput:
        """Draw this step's spans and noise from ``generator`` and return the x-space distillation loss.

        Raises:
            DataError: the rows do not split into whole blocks of latents.
        """
        dit, ps = self.denoiser.dit, self.embedder.vae.config.patch_size
        bs, length = dit.config.block_size, batch.ids.shape[1]
        if length % (ps * bs):
            raise DataError(
                f"data.seq_len={length}: Cola distillation needs rows of whole blocks, a multiple of "
                f"patch_size × block_size = {ps * bs} tokens"
            )
        with torch.no_grad():
            x = self.embedder(batch).float()  # (B, n, C)
        draws = draw_spans(self.schedule, x, self.settings, generator)
        z, t_s = draws.z, draws.t_s  # (B, n, C), (B,)
        teacher = self.teacher.denoiser(x.device)
        assert isinstance(teacher, ColaDenoiser), f"the teacher of a Cola student is a Cola run, got {type(teacher)}"
        predict = guided_transport(teacher.dit, self.schedule, x, self.settings.guidance)
        target = teacher_target(predict, z, draws.grid, torch.zeros_like(z))  # (B, n, C)
        student = block_velocity(dit, self.schedule, x, z, t_s, history=True)
        x_hat = self.schedule.predict(student, z, t_s).x  # (B, n, C)
        real = batch.mask.view(x.shape[0], -1, ps).any(dim=-1).float()  # (B, n): real when one of its tokens is
        loss = per_example_mean((x_hat - target).pow(2).mean(dim=-1), real).mean()
        return LossOutput(loss=loss, metrics={"pd_loss": float(loss.detach())})
