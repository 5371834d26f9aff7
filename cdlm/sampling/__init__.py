"""Rectified-flow samplers shared by every method: grids, guidance wrappers and solvers."""

from cdlm.sampling.types import DenoiseFn, PredictFn, Prediction, SampleOutput, StepCallback, StepInfo

__all__ = ["DenoiseFn", "PredictFn", "Prediction", "SampleOutput", "StepCallback", "StepInfo"]
