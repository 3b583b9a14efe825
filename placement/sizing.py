"""Predicting a model's in-memory size before it is loaded, from its file size and what loads taught us.

A cache must make room *before* a load (evicting after would overcommit memory, the OOM-kill complaint
against ModelMesh), but a model's real footprint is only known once it is loaded. ModelMesh's runtime
adapters guess ``file size x MODELSIZE_MULTIPLIER`` (1.25) with a fixed ``DEFAULT_MODELSIZE`` of
1,000,000 bytes when nothing better is known; one multiplier fits no one: a pickled scikit-learn forest
grows in memory, an XGBoost JSON dump shrinks.

So the ratio is learned per model type. Each completed load reports its measured size; the type's
ratio moves towards ``measured / file_size`` by an exponentially weighted moving average, so it follows
a changing mix of models while one odd model moves it only a little. For the first few observations the
weight is ``1 / (n + 1)`` instead (a running mean in which the default ratio counts as one sample), so
that a new type converges in a handful of loads rather than drifting in from the default.

Each observed ratio is clamped to ``[min_ratio, max_ratio]`` before it is averaged in: a measured size
comes from a memory delta that can be noise (near 0 when the allocator reuses freed pages, huge when a
concurrent load's memory is counted), and one such outlier must not wreck the estimate. Predictions are
never below ``floor_bytes``: over-predicting a tiny model only reserves a little memory until its real
size replaces the prediction, while under-predicting lets loads overcommit.

The estimator holds a handful of floats per model type, needs no clock, and is deterministic.
"""

from __future__ import annotations

import math

__all__ = ["SizeEstimator"]


class SizeEstimator:
    """Predicts in-memory size as ``file_size x ratio(model_type)``, the ratio learned from loads.

    Parameters (all keyword-only):
      default_ratio: the ratio of a type with no observation yet (ModelMesh adapters' 1.25).
      alpha: the EWMA weight of a new observation once warmed up, in (0, 1]; 0.2 gives a memory of
        roughly the last 5-10 loads of a type.
      min_ratio, max_ratio: the range observed ratios are clamped to (see the module docstring).
      floor_bytes: the smallest prediction, and the prediction when the file size is unknown (<= 0);
        1,000,000 bytes like the adapters' DEFAULT_MODELSIZE.
    """

    __slots__ = ("_alpha", "_counts", "_default_ratio", "_floor", "_max_ratio", "_min_ratio", "_ratios")

    def __init__(
        self,
        *,
        default_ratio: float = 1.25,
        alpha: float = 0.2,
        min_ratio: float = 0.1,
        max_ratio: float = 20.0,
        floor_bytes: int = 1_000_000,
    ) -> None:
        if not 0.0 < min_ratio <= default_ratio <= max_ratio or not math.isfinite(max_ratio):
            raise ValueError(
                "need 0 < min_ratio <= default_ratio <= max_ratio < inf, got "
                f"{min_ratio!r}, {default_ratio!r}, {max_ratio!r}"
            )
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        if floor_bytes < 0:
            raise ValueError(f"floor_bytes must be >= 0, got {floor_bytes}")
        self._default_ratio = default_ratio
        self._alpha = alpha
        self._min_ratio = min_ratio
        self._max_ratio = max_ratio
        self._floor = floor_bytes
        self._ratios: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    @property
    def floor_bytes(self) -> int:
        """The smallest prediction."""
        return self._floor

    def ratio(self, model_type: str) -> float:
        """The current in-memory / on-disk ratio for ``model_type``."""
        return self._ratios.get(model_type, self._default_ratio)

    def observations(self, model_type: str) -> int:
        """How many loads of ``model_type`` have been observed (0: the ratio is the default)."""
        return self._counts.get(model_type, 0)

    def predict(self, model_type: str, file_size: int) -> int:
        """Predicted in-memory bytes of a ``model_type`` model whose files total ``file_size`` bytes.

        Rounded up, and never below ``floor_bytes``; ``floor_bytes`` when ``file_size <= 0`` (unknown).
        """
        if file_size <= 0:
            return self._floor
        return max(self._floor, math.ceil(file_size * self.ratio(model_type)))

    def observe(self, model_type: str, file_size: int, measured: int) -> None:
        """Learn from a load of a ``model_type`` model: ``file_size`` on disk, ``measured`` in memory.

        Ignored when either size is not positive, since no ratio can be learned from it (a runtime that
        cannot measure reports 0).
        """
        if file_size <= 0 or measured <= 0:
            return
        observed = min(self._max_ratio, max(self._min_ratio, measured / file_size))
        n = self._counts.get(model_type, 0) + 1
        self._counts[model_type] = n
        # Running mean with the default as one pseudo-sample while 1/(n+1) > alpha, EWMA afterwards.
        weight = max(self._alpha, 1.0 / (n + 1))
        current = self.ratio(model_type)
        self._ratios[model_type] = current + weight * (observed - current)
