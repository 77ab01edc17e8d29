"""The two decisions the pipeline branches on, as pure functions (no IO, no clocks, no randomness).

    decision = pilot_passed(rows, cfg.pilot, cfg.train, full_steps=cfg.train.max_steps,
                            val_reward=None, reward_weights=cfg.rewards.weights)
    flags = watch(rows, cfg.train.watch)          # the full run, every step: sustained KL, tied rewards
    new_train, changes = apply_adjustments(cfg.train, decision)    # when pilot.auto_adjust
    promo = should_promote(result["candidate"], result["base"], result.get("champion"), cfg.evaluate)

``pilot_passed`` reads the per-step metrics stream of the pilot run (dicts with TRL's names: ``step``,
``loss``, ``reward``, ``rewards/<name>/mean``, ``kl``, ``grad_norm``, ``samples_per_s``, ...). It *passes*
when nothing is NaN/inf, the reward does not trend down, and the KL stays bounded. Independently it
*diagnoses* the problems GRPO runs commonly hit and proposes a remedy for each, with a machine-applicable
``adjust`` mapping of dotted config keys (``train.learning_rate``, ``rewards.weights.detail_f1``,
``train.augment``) to a rule: ``{"scale": f}`` (multiply the value the full run is given by f) or
``{"set": v}``. Remedies are relative on purpose: the pilot stage does not depend on every train key, so a
value the user changes after the pilot (a lower learning rate, say) is what the remedy applies to - an
absolute "5e-4" stored by the pilot would silently override it:

- unstable: NaN/inf, or a grad-norm spike above ``pilot.max_grad_norm_spike`` x the median grad norm, or a
  loss outlier that far out in median-absolute-deviation units -> halve the learning rate.
- modality misalignment: alignment rewards (detail_f1 / clip_score / reference) below ``pilot.alignment_low``
  while the surface rewards (format / fluency) are at or above ``1 - pilot.alignment_low``: the policy learned
  the form of an answer without looking at the image -> double the alignment reward weights.
- over-fitting: train reward above the val reward by more than ``pilot.overfit_gap`` -> augmentation on.

The reward trend is the least-squares slope of ``reward`` over ``step``. A 10-step pilot is noisy, so the
gate fails only when the slope is *significantly* below ``pilot.min_reward_slope``: below it by more than two
standard errors of the slope. A clean, steady decline (zero residual) always fails.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

ALIGNMENT_REWARDS = ("detail_f1", "clip_score", "reference")
SURFACE_REWARDS = ("format", "fluency")
LR_FACTOR = 0.5
WEIGHT_FACTOR = 2.0
SLOPE_SIGMAS = 2.0
TAIL_FRACTION = 0.5  # "current level" of a reward = mean over the last half of the pilot


@dataclass(frozen=True)
class PilotDecision:
    passed: bool
    reasons: list[str]
    diagnoses: list[dict[str, Any]] = field(default_factory=list)
    throughput: float | None = None               # completions (samples) per second, median over steps
    estimated_full_seconds: float | None = None   # full run: full_steps * completions_per_step / throughput
    reward_slope: float | None = None
    reward_slope_se: float | None = None
    max_kl: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    against: str                                  # "champion" | "base"
    reasons: list[str]
    improvement: float | None = None              # candidate - reference on the primary metric
    guards: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- helpers


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> list[tuple[float, float]]:
    """``(step, value)`` for the rows that carry a finite ``key``; step defaults to the row index."""
    out = []
    for i, r in enumerate(rows):
        v = r.get(key)
        if _finite(v):
            step = r.get("step", i)
            out.append((float(step) if _finite(step) else float(i), float(v)))
    return out


def least_squares_slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """``(slope, standard error)`` of the ordinary least-squares line y = a + b x.

    SE = sqrt(SSR / (n - 2) / Sxx); it is 0 for n <= 2 (no residual degrees of freedom: a two-point fit
    is exact, so the slope is taken at face value).
    """
    n = len(xs)
    if n < 2:
        return 0.0, 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0, 0.0
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    if n <= 2:
        return b, 0.0
    a = my - b * mx
    ssr = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return b, math.sqrt(ssr / (n - 2) / sxx)


def _tail_mean(values: Sequence[float]) -> float:
    k = max(1, math.ceil(len(values) * TAIL_FRACTION))
    tail = values[-k:]
    return sum(tail) / len(tail)


def _non_finite(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """``"step 3: loss=nan"`` for every numeric non-finite value in the stream."""
    bad = []
    for i, r in enumerate(rows):
        for k, v in r.items():
            if isinstance(v, float) and not math.isfinite(v):
                bad.append(f"step {r.get('step', i)}: {k}={v}")
    return bad


# ------------------------------------------------------------------------------------------- diagnoses


def _diagnose_unstable(rows, pilot_cfg, train_cfg, bad: list[str]) -> dict[str, Any] | None:
    evidence = []
    if bad:
        evidence.append(f"non-finite values: {', '.join(bad[:5])}" + (" ..." if len(bad) > 5 else ""))
    grads = _series(rows, "grad_norm")
    if len(grads) >= 3:
        med = statistics.median([g for _, g in grads])
        step, peak = max(grads, key=lambda sg: sg[1])
        if med > 0 and peak > pilot_cfg.max_grad_norm_spike * med:
            evidence.append(f"grad_norm spike {peak:.4g} at step {step:g} = {peak / med:.1f}x the median "
                            f"{med:.4g} (limit {pilot_cfg.max_grad_norm_spike:g}x)")
    losses = _series(rows, "loss")
    if len(losses) >= 5:
        # GRPO's loss hovers around 0 (advantages are zero-mean), so "x times the median" is meaningless;
        # measure outliers in median-absolute-deviation units instead.
        vals = [v for _, v in losses]
        med = statistics.median(vals)
        mad = statistics.median([abs(v - med) for v in vals])
        if mad > 0:
            step, v = max(losses, key=lambda sv: abs(sv[1] - med))
            if abs(v - med) > pilot_cfg.max_grad_norm_spike * mad:
                evidence.append(f"loss spike {v:.4g} at step {step:g}: {abs(v - med) / mad:.1f} MADs from the "
                                f"median {med:.4g} (limit {pilot_cfg.max_grad_norm_spike:g})")
    if not evidence:
        return None
    lr = train_cfg.learning_rate
    return {"problem": "unstable",
            "evidence": "; ".join(evidence),
            "remedy": f"lower train.learning_rate x{LR_FACTOR:g} (now {lr:g} -> {lr * LR_FACTOR:g}; or accumulate "
                      f"more micro-batches per step: lower train.micro_batch_size / raise train.prompts_per_step)",
            "adjust": {"train.learning_rate": {"scale": LR_FACTOR}}}


def _diagnose_misalignment(rows, pilot_cfg, reward_weights) -> dict[str, Any] | None:
    levels = {}
    for name in ALIGNMENT_REWARDS + SURFACE_REWARDS:
        s = _series(rows, f"rewards/{name}/mean")
        if s:
            levels[name] = _tail_mean([v for _, v in s])
    low = {n: levels[n] for n in ALIGNMENT_REWARDS if n in levels and levels[n] < pilot_cfg.alignment_low}
    high_cut = 1.0 - pilot_cfg.alignment_low
    surface = {n: levels[n] for n in SURFACE_REWARDS if n in levels}
    if not low or not surface or min(surface.values()) < high_cut:
        return None
    weights = dict(reward_weights or {})
    adjust = {f"rewards.weights.{n}": {"scale": WEIGHT_FACTOR} for n in sorted(low)}
    fmt = lambda d: ", ".join(f"{k}={v:.3f}" for k, v in sorted(d.items()))  # noqa: E731
    now = ", ".join(f"rewards.weights.{n} {weights.get(n, 1.0):g} -> {weights.get(n, 1.0) * WEIGHT_FACTOR:g}"
                    for n in sorted(low))
    return {"problem": "modality_misalignment",
            "evidence": f"alignment rewards low ({fmt(low)} < {pilot_cfg.alignment_low:g}) while surface rewards "
                        f"are high ({fmt(surface)} >= {high_cut:g}): answers have the right form but do not "
                        f"describe the image",
            "remedy": f"raise the alignment reward weights x{WEIGHT_FACTOR:g} (now {now})",
            "adjust": adjust}


def _diagnose_overfit(rows, pilot_cfg, train_cfg, val_reward) -> dict[str, Any] | None:
    if val_reward is None or not _finite(val_reward):
        return None
    rewards = _series(rows, "reward")
    if not rewards:
        return None
    train_level = _tail_mean([v for _, v in rewards])
    gap = train_level - float(val_reward)
    if gap <= pilot_cfg.overfit_gap:
        return None
    evidence = (f"train reward {train_level:.3f} (last {TAIL_FRACTION:.0%} of steps) exceeds val reward "
                f"{float(val_reward):.3f} by {gap:.3f} > pilot.overfit_gap {pilot_cfg.overfit_gap:g}")
    if train_cfg.augment:
        return {"problem": "overfitting", "evidence": evidence,
                "remedy": "augmentation is already on: use more training data (train.subset / data.num_train) "
                          "or fewer steps (train.max_steps)", "adjust": {}}
    return {"problem": "overfitting", "evidence": evidence,
            "remedy": "turn label-preserving augmentation on (train.augment: true)",
            "adjust": {"train.augment": {"set": True}}}


# ---------------------------------------------------------------------------------------------- the gates


def _throughput(rows: Sequence[Mapping[str, Any]]) -> float | None:
    s = [v for _, v in _series(rows, "samples_per_s") if v > 0]
    return statistics.median(s) if s else None


def pilot_passed(metrics_rows: Sequence[Mapping[str, Any]], pilot_cfg: Any, train_cfg: Any, full_steps: int,
                 *, val_reward: float | None = None,
                 reward_weights: Mapping[str, float] | None = None) -> PilotDecision:
    """Decide whether the pilot run justifies the full run; diagnose what looks wrong either way.

    ``train_cfg`` is the *full* run's TrainConfig (its learning rate is what a remedy lowers; its
    ``completions_per_step`` sizes the wall-time estimate). ``val_reward``: the pilot policy's mean reward on
    val items, when measured (enables the over-fitting check). ``reward_weights``: cfg.rewards.weights, so a
    remedy can say the new absolute weight (an unknown weight counts as 1.0).
    """
    rows = list(metrics_rows)
    reasons: list[str] = []
    if not rows:
        return PilotDecision(False, ["the pilot wrote no metrics rows: it did not run a single step"])
    ok = True

    bad = _non_finite(rows)
    if bad:
        ok = False
        reasons.append(f"non-finite metrics in {len(bad)} place(s), first: {bad[0]}")
    else:
        reasons.append("no NaN/inf in the metrics")

    rewards = _series(rows, "reward")
    slope = se = None
    if len(rewards) < 2:
        ok = False
        reasons.append(f"reward trend unknown: {len(rewards)} finite 'reward' value(s), need >= 2 steps")
    else:
        slope, se = least_squares_slope([s for s, _ in rewards], [v for _, v in rewards])
        floor = pilot_cfg.min_reward_slope
        if slope + SLOPE_SIGMAS * se < floor:
            ok = False
            reasons.append(f"reward trend {slope:+.4g}/step (se {se:.2g}) is significantly below "
                           f"pilot.min_reward_slope {floor:g}")
        else:
            reasons.append(f"reward trend {slope:+.4g}/step (se {se:.2g}) is not significantly below "
                           f"pilot.min_reward_slope {floor:g}")

    kls = _series(rows, "kl")
    max_kl = max((v for _, v in kls), default=None)
    if max_kl is not None and max_kl > pilot_cfg.max_kl:
        ok = False
        step = max(kls, key=lambda sv: sv[1])[0]
        reasons.append(f"KL {max_kl:.4g} at step {step:g} exceeds pilot.max_kl {pilot_cfg.max_kl:g}")
    elif max_kl is not None:
        reasons.append(f"KL bounded: max {max_kl:.4g} <= pilot.max_kl {pilot_cfg.max_kl:g}")
    else:
        reasons.append("no KL logged (beta = 0: no reference model), nothing to bound")

    tput = _throughput(rows)
    est = None
    if tput is not None:
        est = full_steps * train_cfg.completions_per_step / tput
        reasons.append(f"throughput {tput:.3g} samples/s -> full run of {full_steps} steps x "
                       f"{train_cfg.completions_per_step} completions ~ {est:.0f} s")
    else:
        reasons.append("no 'samples_per_s' logged: cannot estimate the full run's wall time")

    diagnoses = [d for d in (_diagnose_unstable(rows, pilot_cfg, train_cfg, bad),
                             _diagnose_misalignment(rows, pilot_cfg, reward_weights),
                             _diagnose_overfit(rows, pilot_cfg, train_cfg, val_reward)) if d is not None]
    return PilotDecision(passed=ok, reasons=reasons, diagnoses=diagnoses, throughput=tput,
                         estimated_full_seconds=est, reward_slope=slope, reward_slope_se=se, max_kl=max_kl)


def _adjusted(old: Any, rule: Any) -> tuple[Any, str]:
    """(new value, how) for one ``adjust`` rule applied to ``old``."""
    if isinstance(rule, Mapping) and "scale" in rule:
        return old * rule["scale"], f"x{rule['scale']:g}"
    if isinstance(rule, Mapping) and "set" in rule:
        return rule["set"], "set"
    # A bare value is an absolute remedy from a pilot report written before remedies were relative: applying
    # it would override a value the user changed since (the bug relative remedies fixed), so refuse it.
    raise ValueError(f"the pilot report holds an absolute remedy {rule!r} (written by an older vlgrpo); "
                     f"re-run the pilot stage (vlgrpo pilot) so its remedies are relative")


def apply_adjustments(cfg: Any, decision: PilotDecision | Mapping[str, Any]) -> tuple[Any, list[str]]:
    """Apply every diagnosis' ``adjust`` to a config (with ``dataclasses.replace``) → ``(new_cfg, changes)``.

    ``cfg`` is the config the full run is given: a TrainConfig (then only ``train.*`` keys apply; others are
    listed as not applied) or the whole Config (then ``rewards.weights.*`` apply too). A ``{"scale": f}`` rule
    multiplies *that* value, so a value changed after the pilot is what gets scaled. Each change names the
    key, the configured and the effective value, the rule and why, e.g.
    ``train.learning_rate: 0.0001 -> 5e-05 (x0.5; unstable)``. The result is rebuilt through the config's own
    checks, so an impossible value still raises ConfigError.
    """
    from vlgrpo.config import Config, TrainConfig  # local: keeps this module importable without yaml

    diagnoses = decision.diagnoses if isinstance(decision, PilotDecision) else decision.get("diagnoses", [])
    whole = isinstance(cfg, Config)
    if not whole and not isinstance(cfg, TrainConfig):
        raise TypeError(f"apply_adjustments: expected Config or TrainConfig, got {type(cfg).__name__}")
    train = cfg.train if whole else cfg
    weights = dict(cfg.rewards.weights) if whole else {}
    train_changes: dict[str, Any] = {}
    changes: list[str] = []
    for d in diagnoses:
        for key, rule in (d.get("adjust") or {}).items():
            section, _, rest = key.partition(".")
            name = rest[len("weights."):]
            if section == "train" and rest in {f.name for f in dataclasses.fields(TrainConfig)}:
                old = getattr(train, rest)
                train_changes[rest], how = _adjusted(old, rule)
                changes.append(f"{key}: {old!r} -> {train_changes[rest]!r} ({how}; {d['problem']})")
            elif whole and section == "rewards" and rest.startswith("weights.") and name in weights:
                old = weights[name]
                new, how = _adjusted(old, rule)
                weights[name] = float(new)
                changes.append(f"{key}: {old!r} -> {weights[name]!r} ({how}; {d['problem']})")
            else:
                changes.append(f"{key}: not applied to this {type(cfg).__name__} ({d['problem']}); change it "
                               f"in params.yaml")
    new_train = dataclasses.replace(train, **train_changes) if train_changes else train
    if not whole:
        return new_train, changes
    return dataclasses.replace(cfg, train=new_train,
                               rewards=dataclasses.replace(cfg.rewards, weights=weights)), changes


def should_promote(candidate: Mapping[str, Any], base: Mapping[str, Any], champion: Mapping[str, Any] | None,
                   evaluate_cfg: Any) -> PromotionDecision:
    """Promote when the candidate beats the champion (or the base, without one) on the primary metric by at
    least ``evaluate.min_improvement`` (and by more than 0: a tie never replaces what is there, unless
    ``min_improvement`` is negative, i.e. the user explicitly accepts a non-improvement) and no guard
    metric drops by more than its allowed amount against that same reference."""
    against, ref = ("champion", champion) if champion is not None else ("base", base)
    metric = evaluate_cfg.primary_metric
    reasons: list[str] = []
    c, r = candidate.get(metric), ref.get(metric)
    if not _finite(c) or not _finite(r):
        missing = "candidate" if not _finite(c) else against
        return PromotionDecision(False, against, [f"primary metric {metric!r} is missing or not finite for "
                                                  f"the {missing} (got {c if missing == 'candidate' else r!r})"])
    improvement = float(c) - float(r)
    promote = True
    need = evaluate_cfg.min_improvement
    if improvement >= need and (improvement > 0 or need < 0):
        reasons.append(f"{metric}: candidate {c:.4f} vs {against} {r:.4f}: {improvement:+.4f} >= "
                       f"evaluate.min_improvement {need:g}")
    else:
        promote = False
        why = (f"does not beat the {against}" if improvement <= 0
               else f"is below evaluate.min_improvement {need:g}")
        reasons.append(f"{metric}: candidate {c:.4f} vs {against} {r:.4f}: {improvement:+.4f} {why}")
    guards: dict[str, dict[str, Any]] = {}
    for name, max_drop in evaluate_cfg.guard_metrics.items():
        gc, gr = candidate.get(name), ref.get(name)
        if not _finite(gc) or not _finite(gr):
            promote = False
            guards[name] = {"ok": False, "max_drop": max_drop, "drop": None}
            reasons.append(f"guard {name!r} cannot be checked: missing for the "
                           f"{'candidate' if not _finite(gc) else against}")
            continue
        drop = float(gr) - float(gc)
        ok = drop <= max_drop + 1e-12  # a drop of exactly the allowed amount is allowed (float slack)
        guards[name] = {"ok": ok, "max_drop": max_drop, "drop": drop}
        if ok:
            reasons.append(f"guard {name}: {gc:.4f} vs {against} {gr:.4f} (drop {drop:+.4f} <= {max_drop:g})")
        else:
            promote = False
            reasons.append(f"guard {name} broken: {gc:.4f} vs {against} {gr:.4f} drops {drop:.4f} > allowed "
                           f"{max_drop:g}")
    return PromotionDecision(promote, against, reasons, improvement, guards)


# ----------------------------------------------------------------------------------- the full run's watch

WATCHED = {   # flag kind -> (metric, the WatchConfig field holding its limit)
    "kl": ("kl", "max_kl"),
    "reward_collapse": ("frac_reward_zero_std", "collapse_frac"),
}


def watch(rows: Sequence[Mapping[str, Any]], watch_cfg: Any) -> list[dict[str, Any]]:
    """What the full run's watch flags in a metrics stream (``train.watch``): for each check, its first
    stretch of ``patience`` or more steps in a row over the limit → ``{"kind", "first_step", "last_step",
    "steps", "peak", "limit", "message"}`` (``last_step``: where the stretch ended, or the last row).

    ``kl``: ``kl`` above ``max_kl``. ``reward_collapse``: ``frac_reward_zero_std`` at or above
    ``collapse_frac`` (every group's rewards tie: the advantages are 0 and the policy gets no signal). A row
    without the metric (beta 0: no KL) breaks no stretch and extends none.
    """
    flags = []
    for kind, (metric, limit_key) in WATCHED.items():
        limit = getattr(watch_cfg, limit_key)
        if limit is None:
            continue
        over = (lambda v: v > limit) if kind == "kl" else (lambda v: v >= limit)
        run: list[tuple[float, float]] = []
        found = None
        for step, v in _series(rows, metric):
            if over(v):
                run.append((step, v))
                continue
            if len(run) >= watch_cfg.patience:
                found = run
                break
            run = []
        if found is None and len(run) >= watch_cfg.patience:
            found = run
        if found is None:
            continue
        first, last = found[0][0], found[-1][0]
        peak = max(v for _, v in found)
        what = (f"KL to the reference above train.watch.max_kl {limit:g}" if kind == "kl" else
                f"frac_reward_zero_std (groups whose rewards all tie: no learning signal) at or above "
                f"train.watch.collapse_frac {limit:g}")
        flags.append({"kind": kind, "first_step": int(first), "last_step": int(last), "steps": len(found),
                      "peak": peak, "limit": limit,
                      "message": f"{what} for {len(found)} steps in a row (steps {first:g}-{last:g}, "
                                 f"peak {peak:.4g})"})
    return flags


def stop_reason(flags: Sequence[Mapping[str, Any]], watch_cfg: Any) -> dict[str, Any] | None:
    """The first flag ``train.watch.stop_on`` stops the run on, or None."""
    return next((dict(f) for f in flags if f["kind"] in watch_cfg.stop_on), None)
