"""The base of the models that wrap a model to run some of its steps another way (CUDA-graph replay,
the one-region CPU decode step, the thread-count tuner): everything they do not define is the
wrapped model's, so `Instance` and the benchmarks take a wrapper wherever they take a model."""
from __future__ import annotations

from typing import Any


class ModelWrapper:
    def __init__(self, model: Any):
        self.model = model

    def __getattr__(self, name: str) -> Any:
        # config, kernels, weights: the wrapped model's (only called for names not found here)
        return getattr(self.__dict__["model"], name)
