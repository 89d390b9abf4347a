"""Cheap deterministic fitness functions for the search tests (importable by Ray workers and subprocesses)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from vlmerge.search.fitness import Evaluation

OPTIMUM = np.array([0.2, 0.8, 0.35, 0.6, 0.45])


@dataclass
class Sphere:
    """Negative squared distance to OPTIMUM (maximum 0); optionally slow, optionally failing on a pattern."""

    sleep: float = 0.0
    vary_sleep: bool = False  # sleep longer for larger x[0]: parallel candidates finish out of order
    fail_above: float | None = None  # x[0] above this -> raises
    nan_below: float | None = None  # x[0] below this -> NaN
    calls: int = 0

    def __call__(self, x: np.ndarray) -> Evaluation:
        self.calls += 1
        np.random.rand()  # touching numpy's global RNG must not change the search
        if self.sleep:
            time.sleep(self.sleep * (0.2 + 4 * abs(float(x[0]))) if self.vary_sleep else self.sleep)
        if self.fail_above is not None and x[0] > self.fail_above:
            raise RuntimeError(f"boom at x0={x[0]:.3f}")
        if self.nan_below is not None and x[0] < self.nan_below:
            return Evaluation(math.nan, {})
        distance = float(np.sum((np.asarray(x) - OPTIMUM[: len(x)]) ** 2))
        return Evaluation(-distance, {"distance": distance})


@dataclass(frozen=True)
class SphereFactory:
    """Picklable: each Ray worker builds its own Sphere."""

    sleep: float = 0.0
    vary_sleep: bool = False

    def __call__(self) -> Sphere:
        return Sphere(sleep=self.sleep, vary_sleep=self.vary_sleep)
