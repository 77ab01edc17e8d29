"""Decision tables for the pilot gate and the promotion gate, on synthetic metric rows."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from vlgrpo.config import EvaluateConfig, PilotConfig, TrainConfig
from vlgrpo.eval.gates import (PilotDecision, apply_adjustments, least_squares_slope, pilot_passed,
                          should_promote)
from tests.settings import tuned_config, tuned_train

PILOT = PilotConfig()          # max_kl 1.0, min_reward_slope 0, spike 10x, overfit_gap .25, alignment_low .3
TRAIN = tuned_train()          # lr 1e-3, 8 prompts x 8 generations = 64 completions per step


def rows(n=10, reward=lambda s: 0.3 + 0.02 * s, **series):
    """A healthy pilot stream: rising reward, small KL, steady grad norm, 32 samples/s."""
    out = []
    for s in range(n):
        r = {"step": s + 1, "loss": 0.01 * ((-1) ** s), "reward": reward(s), "reward_std": 0.2,
             "kl": 0.01 * s, "grad_norm": 1.0 + 0.1 * (s % 3), "samples_per_s": 32.0}
        for k, f in series.items():
            r[k.replace("__", "/")] = f(s)
        out.append(r)
    return out


# ------------------------------------------------------------------------------------------- pilot_passed


def test_slope_and_standard_error_by_hand():
    assert least_squares_slope([1, 2, 3, 4], [1, 3, 5, 7]) == (2.0, 0.0)
    # y = 0, 1, 0, 1 over x = 0..3: b = Sxy/Sxx = 1.0/5 = 0.2; residual SS = 0.8 -> se = sqrt(0.8/2/5)
    b, se = least_squares_slope([0, 1, 2, 3], [0, 1, 0, 1])
    assert b == pytest.approx(0.2) and se == pytest.approx(math.sqrt(0.08))


def test_healthy_pilot_passes_with_throughput_and_estimate():
    d = pilot_passed(rows(), PILOT, TRAIN, full_steps=60)
    assert d.passed, d.reasons
    assert d.diagnoses == []
    assert d.throughput == 32.0
    assert d.estimated_full_seconds == pytest.approx(60 * 64 / 32.0)   # 120 s
    assert d.reward_slope == pytest.approx(0.02)
    assert d.max_kl == pytest.approx(0.09)


def test_empty_stream_fails():
    d = pilot_passed([], PILOT, TRAIN, full_steps=60)
    assert not d.passed and "no metrics rows" in d.reasons[0]


def test_nan_fails_and_is_diagnosed_unstable_with_half_lr():
    rs = rows()
    rs[4]["loss"] = float("nan")
    d = pilot_passed(rs, PILOT, TRAIN, full_steps=60)
    assert not d.passed
    assert any("step 5: loss=nan" in r for r in d.reasons)
    (diag,) = d.diagnoses
    assert diag["problem"] == "unstable"
    assert diag["adjust"] == {"train.learning_rate": {"scale": 0.5}}
    assert "x0.5 (now 0.001 -> 0.0005" in diag["remedy"]


def test_steady_decline_fails_but_noise_around_flat_passes():
    down = pilot_passed(rows(reward=lambda s: 0.6 - 0.02 * s), PILOT, TRAIN, full_steps=60)
    assert not down.passed and down.reward_slope == pytest.approx(-0.02)
    assert any("significantly below" in r for r in down.reasons)
    # flat reward with noise: the fitted slope is slightly negative but well within two standard errors
    noise = [0.05, -0.04, 0.03, -0.06, 0.02, 0.04, -0.05, 0.01, -0.03, 0.0]
    flat = pilot_passed(rows(reward=lambda s: 0.4 + noise[s]), PILOT, TRAIN, full_steps=60)
    assert flat.reward_slope < 0
    assert flat.passed, flat.reasons


def test_kl_above_the_bound_fails():
    rs = rows()
    rs[7]["kl"] = 1.5
    d = pilot_passed(rs, PILOT, TRAIN, full_steps=60)
    assert not d.passed and d.max_kl == 1.5
    assert any("KL 1.5 at step 8 exceeds pilot.max_kl 1" in r for r in d.reasons)


def test_grad_norm_spike_is_diagnosed_but_does_not_fail_alone():
    rs = rows()
    rs[6]["grad_norm"] = 50.0                       # median ~1.1 -> ~45x > 10x
    d = pilot_passed(rs, PILOT, TRAIN, full_steps=60)
    assert d.passed
    (diag,) = d.diagnoses
    assert diag["problem"] == "unstable" and "grad_norm spike 50 at step 7" in diag["evidence"]
    below = rows()
    below[6]["grad_norm"] = 9.0                      # ~8x: under the 10x limit
    assert pilot_passed(below, PILOT, TRAIN, full_steps=60).diagnoses == []


def test_modality_misalignment_doubles_alignment_weights():
    rs = rows(rewards__detail_f1__mean=lambda s: 0.1, rewards__format__mean=lambda s: 0.95,
              rewards__fluency__mean=lambda s: 0.9)
    d = pilot_passed(rs, PILOT, TRAIN, full_steps=60, reward_weights={"detail_f1": 0.5, "format": 0.1})
    (diag,) = d.diagnoses
    assert diag["problem"] == "modality_misalignment"
    assert diag["adjust"] == {"rewards.weights.detail_f1": {"scale": 2.0}}
    assert "rewards.weights.detail_f1 0.5 -> 1" in diag["remedy"]
    # format high but fluency only 0.5 (< 1 - 0.3): not the misalignment pattern
    rs2 = rows(rewards__detail_f1__mean=lambda s: 0.1, rewards__format__mean=lambda s: 0.95,
               rewards__fluency__mean=lambda s: 0.5)
    assert pilot_passed(rs2, PILOT, TRAIN, full_steps=60).diagnoses == []
    # alignment reward fine: nothing to say
    rs3 = rows(rewards__clip_score__mean=lambda s: 0.6, rewards__format__mean=lambda s: 0.95)
    assert pilot_passed(rs3, PILOT, TRAIN, full_steps=60).diagnoses == []


def test_overfitting_turns_augmentation_on_only_when_val_is_far_below():
    rs = rows(reward=lambda s: 0.8)                   # flat 0.8 in training
    far = pilot_passed(rs, PILOT, TRAIN, full_steps=60, val_reward=0.5)   # gap .3 > .25
    (diag,) = far.diagnoses
    assert diag["problem"] == "overfitting" and diag["adjust"] == {"train.augment": {"set": True}}
    assert pilot_passed(rs, PILOT, TRAIN, full_steps=60, val_reward=0.6).diagnoses == []   # gap .2
    assert pilot_passed(rs, PILOT, TRAIN, full_steps=60).diagnoses == []                   # no val
    already = pilot_passed(rs, PILOT, tuned_train(augment=True), full_steps=60, val_reward=0.5)
    assert already.diagnoses[0]["adjust"] == {}


def test_apply_adjustments_to_train_and_to_whole_config():
    rs = rows(rewards__detail_f1__mean=lambda s: 0.1, rewards__format__mean=lambda s: 0.95)
    rs[6]["grad_norm"] = 50.0
    cfg = tuned_config()
    cfg = dataclasses.replace(cfg, rewards=dataclasses.replace(cfg.rewards, weights={"accuracy": 1.0,
                                                                                     "detail_f1": 0.5}))
    d = pilot_passed(rs, PILOT, cfg.train, full_steps=60, reward_weights=cfg.rewards.weights,
                     val_reward=0.0)
    assert [x["problem"] for x in d.diagnoses] == ["unstable", "modality_misalignment", "overfitting"]

    new_train, changes = apply_adjustments(cfg.train, d)
    assert isinstance(new_train, TrainConfig)
    assert new_train.learning_rate == 0.0005 and new_train.augment is True
    assert new_train.max_steps == cfg.train.max_steps
    assert changes[0] == "train.learning_rate: 0.001 -> 0.0005 (x0.5; unstable)"
    assert any("rewards.weights.detail_f1: not applied to this TrainConfig" in c for c in changes)

    new_cfg, changes2 = apply_adjustments(cfg, d.to_dict())
    assert new_cfg.rewards.weights == {"accuracy": 1.0, "detail_f1": 1.0}
    assert new_cfg.train.learning_rate == 0.0005 and new_cfg.train.augment is True
    assert "rewards.weights.detail_f1: 0.5 -> 1.0 (x2; modality_misalignment)" in changes2
    assert "train.augment: False -> True (set; overfitting)" in changes2


def test_remedies_scale_the_value_the_full_run_is_given_not_the_pilots():
    """The pilot ran at learning rate 5e-4 and says "halve it"; the user then lowers it to 1e-4 (the pilot
    stage does not re-run for that). The full run trains at 5e-5, not at the pilot's 2.5e-4, and the change
    shows both the configured and the effective value."""
    rs = rows()
    rs[6]["grad_norm"] = 50.0
    at_pilot = tuned_train(learning_rate=5e-4)
    report = json.loads(json.dumps(pilot_passed(rs, PILOT, at_pilot, full_steps=60).to_dict()))  # pilot.json
    lowered = dataclasses.replace(tuned_config(), train=dataclasses.replace(at_pilot, learning_rate=1e-4))
    new_cfg, changes = apply_adjustments(lowered, report)
    assert new_cfg.train.learning_rate == pytest.approx(5e-5)
    assert changes == ["train.learning_rate: 0.0001 -> 5e-05 (x0.5; unstable)"]


def test_an_absolute_remedy_from_an_old_pilot_report_is_refused_not_applied():
    """Before remedies were relative, pilot.json stored the pilot's new value itself ({"train.learning_rate":
    5e-4}); applied now it would override the rate the user set since, so the full run refuses it."""
    old_report = {"passed": True, "reasons": ["ok"], "diagnoses": [
        {"problem": "unstable", "evidence": "", "remedy": "", "adjust": {"train.learning_rate": 5e-4}}]}
    with pytest.raises(ValueError, match=r"absolute remedy 0\.0005.*re-run the pilot stage"):
        apply_adjustments(tuned_config(), old_report)


def test_apply_adjustments_without_diagnoses_is_identity():
    cfg = tuned_train()
    new, changes = apply_adjustments(cfg, PilotDecision(True, ["ok"]))
    assert new is cfg and changes == []


# ------------------------------------------------------------------------------------------ should_promote

EVAL = EvaluateConfig(primary_metric="accuracy", min_improvement=0.02, guard_metrics={"format": 0.05})


@pytest.mark.parametrize("cand, base, champ, promote, against", [
    # no champion: compare with the base
    ({"accuracy": 0.60, "format": 0.90}, {"accuracy": 0.50, "format": 0.90}, None, True, "base"),
    ({"accuracy": 0.51, "format": 0.90}, {"accuracy": 0.50, "format": 0.90}, None, False, "base"),  # +.01 < .02
    ({"accuracy": 0.52, "format": 0.90}, {"accuracy": 0.50, "format": 0.90}, None, True, "base"),  # exactly .02
    ({"accuracy": 0.45, "format": 0.90}, {"accuracy": 0.50, "format": 0.90}, None, False, "base"),  # worse
    ({"accuracy": 0.60, "format": 0.80}, {"accuracy": 0.50, "format": 0.90}, None, False, "base"),  # guard -.10
    ({"accuracy": 0.60, "format": 0.85}, {"accuracy": 0.50, "format": 0.90}, None, True, "base"),   # guard -.05 ok
    # with a champion: the champion is the bar, not the base
    ({"accuracy": 0.60, "format": 0.9}, {"accuracy": 0.3, "format": 0.9}, {"accuracy": 0.65, "format": 0.9},
     False, "champion"),
    ({"accuracy": 0.70, "format": 0.9}, {"accuracy": 0.3, "format": 0.9}, {"accuracy": 0.65, "format": 0.9},
     True, "champion"),
    ({"accuracy": 0.70, "format": 0.8}, {"accuracy": 0.3, "format": 0.8}, {"accuracy": 0.65, "format": 0.9},
     False, "champion"),                                                                          # guard vs champ
    # missing / broken values never promote
    ({"format": 0.9}, {"accuracy": 0.5, "format": 0.9}, None, False, "base"),
    ({"accuracy": float("nan"), "format": 0.9}, {"accuracy": 0.5, "format": 0.9}, None, False, "base"),
    ({"accuracy": 0.9}, {"accuracy": 0.5, "format": 0.9}, None, False, "base"),                   # guard missing
])
def test_should_promote_decision_table(cand, base, champ, promote, against):
    d = should_promote(cand, base, champ, EVAL)
    assert (d.promote, d.against) == (promote, against), d.reasons
    assert d.reasons


def test_tie_never_promotes_even_with_zero_min_improvement():
    cfg = EvaluateConfig(min_improvement=0.0, guard_metrics={})
    d = should_promote({"accuracy": 0.5}, {"accuracy": 0.5}, None, cfg)
    assert not d.promote and "does not beat the base" in d.reasons[0]


def test_promotion_reasons_and_guard_details():
    d = should_promote({"accuracy": 0.60, "format": 0.80}, {"accuracy": 0.50, "format": 0.90}, None, EVAL)
    assert d.improvement == pytest.approx(0.10)
    assert d.guards["format"]["ok"] is False and d.guards["format"]["drop"] == pytest.approx(0.10)
    assert "guard format broken: 0.8000 vs base 0.9000 drops 0.1000 > allowed 0.05" in d.reasons
    assert d.to_dict()["against"] == "base"


def test_negative_min_improvement_accepts_a_tie_or_small_drop_but_not_a_larger_one():
    cfg = EvaluateConfig(min_improvement=-0.05, guard_metrics={})
    assert should_promote({"accuracy": 0.5}, {"accuracy": 0.5}, None, cfg).promote
    assert should_promote({"accuracy": 0.46}, {"accuracy": 0.5}, None, cfg).promote
    assert not should_promote({"accuracy": 0.44}, {"accuracy": 0.5}, None, cfg).promote


def _watch_cfg(**kw):
    from vlgrpo.config import WatchConfig

    return WatchConfig(**{"max_kl": 1.0, "collapse_frac": 1.0, "patience": 3, **kw})


def test_watch_flags_sustained_kl_not_a_spike():
    from vlgrpo.eval.gates import stop_reason, watch

    kl = [0.1, 5.0, 0.2, 1.5, 2.0, 3.0, 8.0, 0.5, 4.0]     # a spike at 2, then steps 4-7 above 1.0
    rows = [{"step": i + 1, "kl": v, "frac_reward_zero_std": 0.0} for i, v in enumerate(kl)]
    flags = watch(rows, _watch_cfg())
    assert [(f["kind"], f["first_step"], f["last_step"], f["steps"], f["peak"]) for f in flags] == \
        [("kl", 4, 7, 4, 8.0)]
    assert flags[0]["message"] == ("KL to the reference above train.watch.max_kl 1 for 4 steps in a row "
                                   "(steps 4-7, peak 8)")
    assert watch(rows, _watch_cfg(patience=5)) == [] and watch(rows, _watch_cfg(max_kl=None)) == []
    assert stop_reason(flags, _watch_cfg()) is None
    assert stop_reason(flags, _watch_cfg(stop_on=("kl",)))["first_step"] == 4


def test_watch_flags_tied_rewards_to_the_last_row_and_skips_missing_metrics():
    from vlgrpo.eval.gates import watch

    fz = [0.5, 1.0, 1.0, None, 1.0, 1.0]                   # a row without the metric breaks no stretch
    rows = [{"step": i + 1, "frac_reward_zero_std": v} for i, v in enumerate(fz)]
    flags = watch(rows, _watch_cfg())
    assert [(f["kind"], f["first_step"], f["last_step"], f["steps"]) for f in flags] == \
        [("reward_collapse", 2, 6, 4)]
    assert watch(rows, _watch_cfg(collapse_frac=None)) == []


def test_watch_config_refuses_a_stop_on_a_check_that_is_off():
    import pytest as _pytest

    from vlgrpo.config import ConfigError, WatchConfig

    with _pytest.raises(ConfigError, match=r"train.watch.stop_on.*'kl' needs train.watch.max_kl"):
        WatchConfig(max_kl=None, stop_on=("kl",))
    with _pytest.raises(ConfigError, match=r"train.watch.patience"):
        WatchConfig(patience=0)
