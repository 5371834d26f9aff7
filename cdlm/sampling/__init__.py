"""Rectified-flow samplers shared by every method: grids, guidance wrappers, solvers and token selection."""

from cdlm.sampling.grids import check_grid, logit_normal, uniform
from cdlm.sampling.guidance import classifier_free, conditional, self_conditioning
from cdlm.sampling.solvers import integrate
from cdlm.sampling.tokens import select_tokens
from cdlm.sampling.types import DenoiseFn, PredictFn, Prediction, SampleOutput, StepCallback, StepInfo

__all__ = [
    "DenoiseFn",
    "PredictFn",
    "Prediction",
    "SampleOutput",
    "StepCallback",
    "StepInfo",
    "check_grid",
    "classifier_free",
    "conditional",
    "integrate",
    "logit_normal",
    "select_tokens",
    "self_conditioning",
    "uniform",
]
