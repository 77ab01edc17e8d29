"""Bootstrap intervals on distributions whose answers are known in closed form."""
from __future__ import annotations

import math

import numpy as np
import pytest

from vlgrpo.eval.stats import bootstrap_ci, clean, normal_half_width, paired_diff_ci


def test_bernoulli_interval_covers_p_and_has_the_normal_width():
    rng = np.random.default_rng(123)
    p, n = 0.3, 2000
    x = (rng.random(n) < p).astype(float)
    mean, lo, hi = bootstrap_ci(x, n_boot=2000, seed=0)
    assert mean == pytest.approx(x.mean(), abs=1e-12)
    assert lo <= 0.3 <= hi
    expected_width = 2 * normal_half_width(p, n)  # 2 * 1.96 * sqrt(p(1-p)/n) ~= 0.0402
    assert expected_width == pytest.approx(0.04017, abs=1e-4)
    assert (hi - lo) == pytest.approx(expected_width, rel=0.15)


def test_interval_narrows_like_one_over_sqrt_n():
    rng = np.random.default_rng(7)
    small = rng.normal(0.0, 1.0, 400)
    large = rng.normal(0.0, 1.0, 3600)
    _, lo_s, hi_s = bootstrap_ci(small, n_boot=2000, seed=1)
    _, lo_l, hi_l = bootstrap_ci(large, n_boot=2000, seed=1)
    # 9x the data -> one third of the width (std of the mean ~ 1/sqrt(n)); normal width 2*1.96/sqrt(n)
    assert (hi_s - lo_s) / (hi_l - lo_l) == pytest.approx(3.0, rel=0.15)
    assert (hi_l - lo_l) == pytest.approx(2 * 1.96 / math.sqrt(3600), rel=0.15)


def test_constant_values_give_a_zero_width_interval():
    assert bootstrap_ci([0.7] * 50, n_boot=500, seed=0) == (0.7, 0.7, 0.7)
    assert bootstrap_ci([1.0], n_boot=500, seed=0) == (1.0, 1.0, 1.0)


def test_same_seed_same_interval_and_different_seed_differs():
    x = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1] * 5
    assert bootstrap_ci(x, n_boot=500, seed=3) == bootstrap_ci(x, n_boot=500, seed=3)
    assert bootstrap_ci(x, n_boot=500, seed=3)[1:] != bootstrap_ci(x, n_boot=500, seed=4)[1:]


def test_none_and_nan_are_dropped():
    assert clean([1.0, None, float("nan"), 0.0, float("inf")]).tolist() == [1.0, 0.0]
    mean, lo, hi = bootstrap_ci([1.0, None, 0.0, float("nan")], n_boot=200, seed=0)
    assert mean == 0.5
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0


def test_empty_raises_with_a_clear_message():
    with pytest.raises(ValueError, match="no finite values"):
        bootstrap_ci([None, float("nan")])
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([1.0], n_boot=0)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([1.0], alpha=1.5)


def test_paired_identical_is_exactly_zero():
    a = np.random.default_rng(0).random(300).tolist()
    assert paired_diff_ci(a, a, n_boot=500, seed=0) == (0.0, 0.0, 0.0)


def test_paired_constant_shift_is_exact():
    a = np.random.default_rng(1).random(300)
    d, lo, hi = paired_diff_ci((a + 0.25).tolist(), a.tolist(), n_boot=500, seed=0)
    assert d == pytest.approx(0.25) and lo == pytest.approx(0.25) and hi == pytest.approx(0.25)


def test_paired_is_narrower_than_independent_when_items_share_difficulty():
    rng = np.random.default_rng(5)
    difficulty = rng.random(1000)                                  # shared by both models
    base = (difficulty > 0.5).astype(float)                        # solves the easy half
    cand = ((difficulty > 0.47) | (base == 1)).astype(float)       # solves those plus 3% more
    d, lo, hi = paired_diff_ci(cand, base, n_boot=2000, seed=0)
    assert d == pytest.approx(cand.mean() - base.mean())
    assert lo > 0.0                                                # a sure improvement...
    _, blo, bhi = bootstrap_ci(base, n_boot=2000, seed=0)
    _, clo, chi = bootstrap_ci(cand, n_boot=2000, seed=0)
    assert clo < bhi                                               # ...that independent CIs blur
    assert (hi - lo) < (bhi - blo)


def test_paired_drops_items_missing_in_either():
    d, lo, hi = paired_diff_ci([1.0, None, 0.0, 1.0], [0.0, 1.0, None, 1.0], n_boot=200, seed=0)
    # usable pairs: (1,0) and (1,1) -> differences 1 and 0
    assert d == 0.5


def test_paired_length_mismatch_raises():
    with pytest.raises(ValueError, match="same items"):
        paired_diff_ci([1.0, 0.0], [1.0])
