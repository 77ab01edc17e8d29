"""Percentile-bootstrap confidence intervals for evaluation metrics (vectorised numpy, seeded).

    from vlgrpo.eval.stats import bootstrap_ci, paired_diff_ci
    mean, lo, hi = bootstrap_ci([1, 0, 1, 1], n_boot=1000, seed=0)          # accuracy of one model
    d, lo, hi = paired_diff_ci(candidate_correct, base_correct, n_boot=1000)  # same items, candidate - base

Why a paired difference: both models answer the *same* test items, so item difficulty is shared. Resampling
items once and differencing inside each resample removes that shared variance; comparing two independent
intervals would call many real improvements "overlapping".

``None`` / NaN entries mean "not applicable" (e.g. a caption reward on a counting item) and are dropped; in a
paired difference an item counts only when both models have a value for it.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# Resample in chunks so n_boot x n index matrices stay below ~8M entries (64 MB of int64).
_MAX_CHUNK_ENTRIES = 8_000_000


def clean(values: Sequence[float | None]) -> np.ndarray:
    """The finite float values of ``values`` (None and NaN dropped), shape (n,)."""
    arr = np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return arr[np.isfinite(arr)]


def _bootstrap_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of ``x``, shape (n_boot,)."""
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_CHUNK_ENTRIES // max(n, 1))
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))  # (b, n) item indices of each resample
        out[start:stop] = x[idx].mean(axis=1)
    return out


def _check_args(n_boot: int, alpha: float) -> None:
    if n_boot < 1:
        raise ValueError(f"bootstrap: n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"bootstrap: alpha must be in (0, 1), got {alpha}")


def bootstrap_ci(values: Sequence[float | None], n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the sample mean and its ``1 - alpha`` percentile-bootstrap interval.

    Raises ValueError when no finite value is left (the caller decides whether a metric applies at all).
    """
    _check_args(n_boot, alpha)
    x = clean(values)
    if x.size == 0:
        raise ValueError("bootstrap_ci: no finite values (all None/NaN or empty)")
    if np.all(x == x[0]):
        v = float(x[0])  # every resample has the same mean: a zero-width interval, exactly (no fp drift)
        return v, v, v
    mean = float(x.mean())
    means = _bootstrap_means(x, n_boot, seed)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    # The percentile interval is built from resample means; clamp so it always contains the point estimate
    # (with a very skewed tiny sample the quantiles can sit on one side of it).
    return mean, float(min(lo, mean)), float(max(hi, mean))


def paired_diff_ci(a: Sequence[float | None], b: Sequence[float | None], n_boot: int = 1000, seed: int = 0,
                   alpha: float = 0.05) -> tuple[float, float, float]:
    """``(mean(a - b), lo, hi)`` over the items where both ``a[i]`` and ``b[i]`` are finite.

    ``a`` and ``b`` are per-item values of two models on the same items, in the same order.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_diff_ci: a and b must score the same items, got {len(a)} vs {len(b)} values")
    fa = np.asarray([np.nan if v is None else float(v) for v in a], dtype=np.float64)
    fb = np.asarray([np.nan if v is None else float(v) for v in b], dtype=np.float64)
    both = np.isfinite(fa) & np.isfinite(fb)
    if not both.any():
        raise ValueError("paired_diff_ci: no item has a finite value in both a and b")
    return bootstrap_ci((fa[both] - fb[both]).tolist(), n_boot=n_boot, seed=seed, alpha=alpha)


def normal_half_width(p: float, n: int, z: float = 1.959964) -> float:
    """Half-width of the normal-approximation interval of a proportion; tests compare against it."""
    return z * math.sqrt(p * (1 - p) / n)
