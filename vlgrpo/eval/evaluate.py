"""Evaluate base vs candidate (vs champion) on the held-out test split: metrics, intervals, the decision.

    from vlgrpo.eval.evaluate import evaluate_models
    from vlgrpo.model.loading import load_model
    result = evaluate_models(cfg, Path("data/manifest.jsonl"), {
        "base": lambda: load_model("models/base"),
        "candidate": lambda: load_model("models/candidate"),
        "champion": None,          # or a loader the caller builds from the MLflow registry
    })
    result["candidate"]["accuracy"], result["delta_vs_base"]["accuracy_lo"], result["decision"]["promote"]

Models arrive as *loaders* (functions returning ``(model, processor)``) so the core never imports MLflow:
the caller resolves ``models:/<name>@champion`` to a directory and hands a loader over. One model is in
memory at a time.

Every model answers the same items (``evaluate.max_items`` caps them, manifest order) with batched greedy
decoding; with ``evaluate.samples_k > 0`` it also samples k answers per item (``train.temperature`` /
``train.top_p``) for pass@k. Per item we score ``accuracy`` plus every configured reward
(``rewards.weights`` names, and ``format`` / ``fluency`` always), the weighted total ``reward`` and the
completion length in tokens. Per model and per task type: the mean of each with a 95% percentile-bootstrap
interval; between models: the *paired* difference (same items) with its interval.

Result layout (flat enough for ``dvc metrics show``; ``items`` holds the per-item answers and is kept out
of reports/evaluate.json by :func:`vlgrpo.eval.report.metrics_only`):

    {"split": "test", "n_items": 200, "primary_metric": "accuracy", "metrics": ["accuracy", ...],
     "base": {"n": 200, "accuracy": 0.41, "accuracy_lo": 0.34, "accuracy_hi": 0.48, "format": ...,
              "items_per_s": ..., "by_task": {"count": {"n": 50, "accuracy": ..., ...}}},
     "candidate": {...}, "champion": {...},
     "delta_vs_base": {"accuracy": 0.22, "accuracy_lo": 0.16, "accuracy_hi": 0.28, ..., "by_task": {...}},
     "delta_vs_champion": {...},
     "decision": {"promote": true, "against": "base", "reasons": [...], ...},
     "items": [{"id", "task", "question", "images", "solution", "references",
                "answers": {model: text}, "correct": {model: bool|None}, "scores": {model: {metric: v}}}]}
"""
from __future__ import annotations

import gc
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from vlgrpo.config import Config
from vlgrpo.data.manifest import Item, read_manifest
from vlgrpo.eval.gates import should_promote
from vlgrpo.eval.stats import bootstrap_ci, paired_diff_ci
from vlgrpo.rewards import RewardContext, RewardState, compute_rewards, extra_columns, reward_prompt, setup_rewards

Loader = Callable[[], tuple[Any, Any]]
ALWAYS_REWARDS = ("format", "fluency")
MODEL_ORDER = ("base", "candidate", "champion")


# --------------------------------------------------------------------------------------------- scoring


def reward_names(cfg: Config) -> list[str]:
    """``accuracy``, then the configured rewards, then format/fluency: every reward the report shows."""
    names = ["accuracy", *cfg.rewards.weights, *ALWAYS_REWARDS]
    return list(dict.fromkeys(names))


def metric_names(cfg: Config) -> list[str]:
    """All headline metrics in report order (``reward`` is the weighted total the trainer optimises)."""
    names = reward_names(cfg) + ["reward", "completion_length", "terminated"]
    if cfg.evaluate.samples_k > 0:
        names.append(pass_at_k_name(cfg.evaluate.samples_k))
    return names


def pass_at_k_name(k: int) -> str:
    return f"pass_at_{k}"


def columns_for(items: Sequence[Item], terminated: Sequence[bool], lengths: Sequence[int] | None = None,
                completion_ids: Sequence[Sequence[int]] | None = None) -> dict[str, list[Any]]:
    """Per-completion reward columns (``Item.columns()`` keys plus ``terminated`` and, when given,
    ``completion_length`` in tokens and ``completion_ids``), one entry per item."""
    keys: list[str] = []
    rows = [it.columns() for it in items]
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    cols = {k: [r.get(k) for r in rows] for k in keys}
    cols["terminated"] = list(terminated)
    if lengths is not None:
        cols["completion_length"] = list(lengths)
    if completion_ids is not None:
        cols["completion_ids"] = [list(c) for c in completion_ids]
    return cols


def score_completions(items: Sequence[Item], completions: Sequence[Any], cfg: Config,
                      rewards: Mapping[str, Callable] | None = None,
                      trainer_state: RewardState | None = None) -> list[dict[str, float | None]]:
    """One record per item: every reward, the weighted ``reward``, ``completion_length``, ``terminated``.

    ``completions[i]`` answers ``items[i]`` (objects with ``text``, ``token_ids``, ``terminated``, i.e.
    :class:`vlgrpo.model.decoding.Completion`). ``rewards``: prebuilt reward functions by name (else the registry).
    Rewards get what training gives them (:func:`vlgrpo.rewards.reward_prompt` prompts, ``completion_ids``);
    ``trainer_state``: default ``RewardState()`` (outside a training run; in-training evaluation passes its step).
    """
    if len(completions) != len(items):
        raise ValueError(f"score_completions: {len(completions)} completions for {len(items)} items")
    names = reward_names(cfg)
    texts = [c.text for c in completions]
    terminated = [bool(c.terminated) for c in completions]
    # Weights only matter for the total; scoring the unweighted extras with weight 0 keeps them out of it.
    weights = {n: float(cfg.rewards.weights.get(n, 0.0)) for n in names}
    lengths = [len(c.token_ids) for c in completions]
    batch = compute_rewards(weights, [reward_prompt(it) for it in items], texts,
                            columns_for(items, terminated, lengths, [c.token_ids for c in completions]),
                            on_error=cfg.rewards.on_error, rewards=rewards, trainer_state=trainer_state)
    records = []
    for i, c in enumerate(completions):
        rec: dict[str, float | None] = {n: batch.per_reward[n][i] for n in names}
        rec["reward"] = batch.total[i]
        rec["completion_length"] = float(len(c.token_ids))
        rec["terminated"] = float(terminated[i])
        records.append(rec)
    return records


def pass_at_k(items: Sequence[Item], sampled: Sequence[Any], k: int,
              rewards: Mapping[str, Callable] | None = None,
              trainer_state: RewardState | None = None) -> list[float | None]:
    """1.0 when any of the k sampled answers of an item is correct (k samples, so the unbiased pass@k
    estimator reduces to "any"); None for items without a verifiable answer.

    ``sampled`` holds ``k`` consecutive completions per item (``num_return_sequences=k``).
    """
    if len(sampled) != k * len(items):
        raise ValueError(f"pass_at_k: {len(sampled)} sampled completions for {len(items)} items x k={k}")
    rep = [it for it in items for _ in range(k)]
    acc = compute_rewards({"accuracy": 1.0}, [reward_prompt(it) for it in rep], [c.text for c in sampled],
                          columns_for(rep, [c.terminated for c in sampled], [len(c.token_ids) for c in sampled],
                                      [c.token_ids for c in sampled]),
                          rewards=rewards, trainer_state=trainer_state).per_reward["accuracy"]
    out: list[float | None] = []
    for i in range(len(items)):
        group = acc[i * k:(i + 1) * k]
        out.append(None if group[0] is None else float(any(v == 1.0 for v in group)))
    return out


# ----------------------------------------------------------------------------------------- aggregation


def _values(records: Sequence[Mapping[str, Any]], metric: str) -> list[float | None]:
    return [r.get(metric) for r in records]


def _has_value(values: Sequence[Any]) -> bool:
    return any(v is not None and math.isfinite(v) for v in values)


def summarize(records: Sequence[Mapping[str, Any]], metrics: Sequence[str], n_boot: int,
              seed: int) -> dict[str, Any]:
    """``{"n": N, m: mean, m_lo: lo, m_hi: hi, [m_n: applicable items when < N]}`` for each metric that
    applies to at least one record; metrics that apply to none are left out (never NaN)."""
    out: dict[str, Any] = {"n": len(records)}
    for m in metrics:
        vals = _values(records, m)
        if not _has_value(vals):
            continue
        mean, lo, hi = bootstrap_ci(vals, n_boot=n_boot, seed=seed)
        out[m], out[f"{m}_lo"], out[f"{m}_hi"] = mean, lo, hi
        n_ok = sum(v is not None and math.isfinite(v) for v in vals)
        if n_ok < len(records):
            out[f"{m}_n"] = n_ok
    return out


def summarize_by_task(tasks: Sequence[str], records: Sequence[Mapping[str, Any]], metrics: Sequence[str],
                      n_boot: int, seed: int) -> dict[str, Any]:
    summary = summarize(records, metrics, n_boot, seed)
    summary["by_task"] = {t: summarize([r for r, tt in zip(records, tasks) if tt == t], metrics, n_boot, seed)
                          for t in sorted(set(tasks))}
    return summary


def paired_deltas(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], metrics: Sequence[str],
                  n_boot: int, seed: int) -> dict[str, Any]:
    """``{m: mean(a - b), m_lo, m_hi}`` over items scored in both (same order); metrics without a pair
    are left out."""
    out: dict[str, Any] = {}
    for m in metrics:
        va, vb = _values(a, m), _values(b, m)
        if not any(x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
                   for x, y in zip(va, vb)):
            continue
        out[m], out[f"{m}_lo"], out[f"{m}_hi"] = paired_diff_ci(va, vb, n_boot=n_boot, seed=seed)
    return out


def paired_deltas_by_task(tasks: Sequence[str], a, b, metrics, n_boot: int, seed: int) -> dict[str, Any]:
    out = paired_deltas(a, b, metrics, n_boot, seed)
    out["by_task"] = {}
    for t in sorted(set(tasks)):
        idx = [i for i, tt in enumerate(tasks) if tt == t]
        out["by_task"][t] = paired_deltas([a[i] for i in idx], [b[i] for i in idx], metrics, n_boot, seed)
    return out


# ------------------------------------------------------------------------------------------ evaluation


def held_out_items(manifest: str | Path, max_items: int | None) -> list[Item]:
    """The manifest's test split in manifest order, capped at ``max_items``."""
    items = read_manifest(manifest, split="test")
    if not items:
        raise ValueError(f"{manifest}: no items with split 'test' to evaluate on (check data.num_test / "
                         f"data.test_fraction)")
    return items[:max_items] if max_items is not None else items


def run_model(model: Any, processor: Any, items: Sequence[Item], manifest_dir: Path, cfg: Config, *,
              rewards: Mapping[str, Callable] | None = None, progress: str | None = None
              ) -> tuple[list[str], list[dict[str, Any]], float]:
    """Greedy (and optionally sampled) answers of one model, scored: ``(answers, records, seconds)``;
    ``progress``: the label of the progress bars (None: none)."""
    import torch

    import dataclasses

    from vlgrpo.model.decoding import generate_answers

    ev = cfg.evaluate
    greedy_dec = greedy_decoding(cfg)
    t0 = time.perf_counter()
    greedy = generate_answers(model, processor, items, manifest_dir, greedy_dec,
                              f"{progress} (greedy)" if progress else None)
    records = score_completions(items, greedy, cfg, rewards)
    if ev.samples_k > 0:
        # Seeded so that pass@k is reproducible; the caller's RNG stream is restored afterwards.
        state = torch.random.get_rng_state()
        torch.manual_seed(ev.seed)
        try:
            sampled_dec = dataclasses.replace(
                greedy_dec, batch_size=max(1, ev.batch_size // ev.samples_k), do_sample=True,
                temperature=cfg.train.temperature, top_p=cfg.train.top_p, num_return_sequences=ev.samples_k)
            sampled = generate_answers(model, processor, items, manifest_dir, sampled_dec,
                                       f"{progress} (pass@{ev.samples_k})" if progress else None)
        finally:
            torch.random.set_rng_state(state)
        for rec, v in zip(records, pass_at_k(items, sampled, ev.samples_k, rewards)):
            rec[pass_at_k_name(ev.samples_k)] = v
    return [c.text for c in greedy], records, time.perf_counter() - t0


def greedy_decoding(cfg: Config) -> Any:
    """How evaluation answers: greedy, ``evaluate.batch_size`` items a batch, up to :func:`answer_length`."""
    from vlgrpo.model.decoding import Decoding

    return Decoding(cfg.evaluate.batch_size, answer_length(cfg), cfg.data.min_pixels, cfg.data.max_pixels)


def val_metrics(model: Any, processor: Any, items: Sequence[Item], manifest_dir: Path, cfg: Config,
                rewards: Mapping[str, Callable] | None = None,
                trainer_state: RewardState | None = None) -> dict[str, float | None]:
    """Evaluation during training (``train.eval_steps``): greedy ``eval/accuracy`` (over items with a
    verifiable answer; None when there are none) and ``eval/reward`` (mean weighted reward) on ``items``.

    Greedy decoding draws no random numbers, so evaluating does not change what training samples next.
    """

    from vlgrpo.model.decoding import generate_answers

    t0 = time.perf_counter()
    greedy = generate_answers(model, processor, items, manifest_dir, greedy_decoding(cfg), None)
    records = score_completions(items, greedy, cfg, rewards, trainer_state)
    secs = time.perf_counter() - t0
    acc = [r["accuracy"] for r in records if r.get("accuracy") is not None]
    return {"eval/accuracy": sum(acc) / len(acc) if acc else None,
            "eval/reward": sum(r["reward"] for r in records) / len(records), "eval/seconds": secs}


def mean_sampled_reward(model: Any, processor: Any, items: Sequence[Item], manifest_dir: Path, cfg: Config, *,
                        samples: int = 4, rewards: Mapping[str, Callable] | None = None) -> float:
    """Mean weighted reward of ``samples`` sampled answers per item, decoded like training rollouts
    (``cfg.train``'s ``temperature`` / ``top_p`` / ``max_completion_length``, seeded with its ``seed``: pass
    the pilot's config as ``dataclasses.replace(cfg, train=pilot_train)``). ``rewards``: the reward
    functions by name (from ``vlgrpo.rewards.setup_rewards``; else the registry's defaults).

    The pilot's over-fitting check compares this on val items with the train reward of the metrics stream:
    both are sampled rewards of the same policy, so the gap measures generalisation, not decoding.
    """
    import torch

    from vlgrpo.model.decoding import Decoding, generate_answers

    tc = cfg.train
    if not items:
        raise ValueError("mean_sampled_reward: no items to score")
    state = torch.random.get_rng_state()
    torch.manual_seed(tc.seed)
    try:
        decoding = Decoding(max(1, cfg.evaluate.batch_size // samples), tc.max_completion_length,
                            cfg.data.min_pixels, cfg.data.max_pixels, do_sample=True, temperature=tc.temperature,
                            top_p=tc.top_p, num_return_sequences=samples)
        comps = generate_answers(model, processor, items, manifest_dir, decoding)
    finally:
        torch.random.set_rng_state(state)
    rep = [it for it in items for _ in range(samples)]
    records = score_completions(rep, comps, cfg, rewards)
    return sum(r["reward"] for r in records) / len(records)


def answer_length(cfg: Config) -> int:
    """The longest answer evaluation generates: ``evaluate.max_new_tokens``, else the training length."""
    return cfg.evaluate.max_new_tokens or cfg.train.max_completion_length


def reward_context(cfg: Config, root: Path, manifest_dir: Path, items: Sequence[Item] = ()) -> RewardContext:
    """The reward context of evaluation: the run's, with its answer length (item images under
    ``manifest_dir``; the extra columns of ``items``)."""
    return RewardContext.from_config(cfg, root, manifest_dir, max_completion_length=answer_length(cfg),
                                     columns=extra_columns(items))


def item_rows(items: Sequence[Item], answers: Mapping[str, Sequence[str]],
              records: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Per-item answers of every model, for the report's sample and reports/evaluate_items.jsonl."""
    rows = []
    for i, it in enumerate(items):
        rows.append({"id": it.id, "task": it.task, "question": it.text, "images": list(it.images),
                     "solution": it.solution, "references": list(it.references),
                     "answers": {m: answers[m][i] for m in answers},
                     "correct": {m: (None if records[m][i].get("accuracy") is None
                                     else records[m][i]["accuracy"] == 1.0) for m in records},
                     "scores": {m: dict(records[m][i]) for m in records}})
    return rows


def evaluate_models(cfg: Config, manifest: str | Path, models: Mapping[str, Loader | None], progress: bool = True,
                    *, root: str | Path = ".") -> dict[str, Any]:
    """Run every model that has a loader on the same test items; return metrics, deltas and the decision.

    ``models``: name -> loader or None (None = not available, e.g. no champion yet). ``base`` and
    ``candidate`` give ``delta_vs_base`` and the promotion decision; ``champion`` adds
    ``delta_vs_champion`` and becomes the bar to beat. ``root``: where relative reward plugin and CLIP paths
    are resolved.
    """
    manifest = Path(manifest)
    root = Path(root)
    ev = cfg.evaluate
    items = held_out_items(manifest, ev.max_items)
    tasks = [it.task for it in items]
    rewards = setup_rewards(reward_names(cfg), reward_context(cfg, root, manifest.parent, items))
    metrics = metric_names(cfg)
    if ev.primary_metric not in metrics:  # fail before minutes of generation, not after
        raise ValueError(f"evaluate.primary_metric {ev.primary_metric!r} is not measured; measured metrics: "
                         f"{', '.join(metrics)}")
    names = [m for m in MODEL_ORDER if models.get(m) is not None]
    names += [m for m, ld in models.items() if ld is not None and m not in names]
    if not names:
        raise ValueError("evaluate_models: no model loaders given")

    result: dict[str, Any] = {"split": "test", "n_items": len(items), "primary_metric": ev.primary_metric,
                              "metrics": metrics, "n_boot": ev.bootstrap, "samples_k": ev.samples_k,
                              "models": names}
    answers: dict[str, list[str]] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        model, processor = models[name]()
        try:
            answers[name], records[name], secs = run_model(model, processor, items, manifest.parent, cfg,
                                                           rewards=rewards,
                                                           progress=f"evaluate {name}" if progress else None)
        finally:
            del model, processor  # one model in memory at a time
            gc.collect()
        block = summarize_by_task(tasks, records[name], metrics, ev.bootstrap, ev.seed)
        block["seconds"] = secs
        block["items_per_s"] = len(items) / secs if secs > 0 else None
        result[name] = block

    if "candidate" in records:
        for ref in ("base", "champion"):
            if ref in records:
                result[f"delta_vs_{ref}"] = paired_deltas_by_task(tasks, records["candidate"], records[ref],
                                                                  metrics, ev.bootstrap, ev.seed)
        if "base" in records:
            result["decision"] = should_promote(result["candidate"], result["base"], result.get("champion"),
                                                ev).to_dict()
    result["items"] = item_rows(items, answers, records)
    return result
