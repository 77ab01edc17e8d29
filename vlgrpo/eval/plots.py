"""Figures (matplotlib, Agg: no display needed) and the CSVs that ``dvc plots show`` renders.

    rows = read_metrics_jsonl("reports/train_metrics.jsonl")
    plot_training_curves(rows, "plots/train_curve.png", "plots/train_curve.csv")      # reward + KL by step
    plot_accuracy_by_task(result, "plots/accuracy_by_task.png", "plots/accuracy_by_task.csv")

``result`` is what :func:`vlgrpo.eval.evaluate.evaluate_models` returns. Every file is written atomically (a
reader never sees half a PNG or CSV).
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines have no display
import matplotlib.pyplot as plt  # noqa: E402

from vlgrpo.io import atomic_write_bytes, atomic_write_text  # noqa: E402

MODEL_ORDER = ("base", "candidate", "champion")
MODEL_COLORS = {"base": "#8c8c8c", "candidate": "#1f77b4", "champion": "#ff7f0e"}


def read_metrics_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The per-step metrics stream, one JSON object a line; a broken line raises naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON object line: {e}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _num(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _write_csv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in r])
    atomic_write_text(path, buf.getvalue())


def _save(fig, path: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _steps(rows: Sequence[Mapping[str, Any]]) -> list[float | None]:
    return [_num(r.get("step", i + 1)) for i, r in enumerate(rows)]


def train_curve_rows(rows: Sequence[Mapping[str, Any]]) -> list[tuple[int, float | None, float | None]]:
    """``(step, reward, kl)`` per metrics row that has a step (rows without one are skipped)."""
    out = []
    for i, r in enumerate(rows):
        step = r.get("step", i + 1)
        if _num(step) is None:
            continue
        out.append((int(step), _num(r.get("reward")), _num(r.get("kl"))))
    return out


def plot_training_curves(rows: Sequence[Mapping[str, Any]], png_path: str | Path, csv_path: str | Path,
                         title: str = "GRPO training") -> Path:
    """Reward (with +-reward_std band when logged) and KL against step; writes the PNG and the CSV."""
    curve = train_curve_rows(rows)
    _write_csv(csv_path, ["step", "reward", "kl"], curve)
    fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [s for s, r, _ in curve if r is not None]
    rewards = [r for _, r, _ in curve if r is not None]
    if steps:
        ax_r.plot(steps, rewards, color=MODEL_COLORS["candidate"], lw=1.5, label="mean reward")
        stds = [_num(r.get("reward_std")) for r in rows if _num(r.get("reward")) is not None
                and _num(r.get("step", 0)) is not None]
        if len(stds) == len(rewards) and all(s is not None for s in stds):
            ax_r.fill_between(steps, [m - s for m, s in zip(rewards, stds)],
                              [m + s for m, s in zip(rewards, stds)], alpha=0.15,
                              color=MODEL_COLORS["candidate"], label="± reward std")
        # Each reward's own mean: shows *which* reward moves (e.g. accuracy up while format stays flat).
        names = sorted({k[len("rewards/"):-len("/mean")] for r in rows for k in r
                        if k.startswith("rewards/") and k.endswith("/mean")})
        palette = ["#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
        for j, name in enumerate(names):
            pts = [(s, _num(r.get(f"rewards/{name}/mean"))) for s, r in zip(_steps(rows), rows)]
            pts = [(s, v) for s, v in pts if s is not None and v is not None]
            if pts:
                ax_r.plot(*zip(*pts), lw=0.9, ls="--", color=palette[j % len(palette)], label=name)
        ax_r.legend(loc="best", fontsize=7)
    else:
        ax_r.text(0.5, 0.5, "no reward logged", ha="center", va="center", transform=ax_r.transAxes)
    ax_r.set(xlabel="step", ylabel="reward", title="reward")
    kl_steps = [s for s, _, k in curve if k is not None]
    if kl_steps:
        ax_k.plot(kl_steps, [k for _, _, k in curve if k is not None], color="#d62728", lw=1.5)
    else:
        ax_k.text(0.5, 0.5, "no KL logged (beta = 0)", ha="center", va="center", transform=ax_k.transAxes)
    ax_k.set(xlabel="step", ylabel="KL (k3)", title="KL to the reference")
    for ax in (ax_r, ax_k):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    _save(fig, png_path)
    return Path(png_path)


def accuracy_rows(result: Mapping[str, Any], metric: str = "accuracy") -> list[tuple[str, str, float, float,
                                                                                      float, int]]:
    """``(task, model, value, lo, hi, n)`` for every task (and "all") and every evaluated model."""
    out = []
    models = [m for m in MODEL_ORDER if isinstance(result.get(m), Mapping)]
    tasks = sorted({t for m in models for t in result[m].get("by_task", {})})
    for task in tasks + ["all"]:
        for m in models:
            block = result[m] if task == "all" else result[m].get("by_task", {}).get(task)
            if not block or _num(block.get(metric)) is None:
                continue
            out.append((task, m, block[metric], block.get(f"{metric}_lo", block[metric]),
                        block.get(f"{metric}_hi", block[metric]), int(block.get(f"{metric}_n", block.get("n", 0)))))
    return out


def plot_accuracy_by_task(result: Mapping[str, Any], png_path: str | Path, csv_path: str | Path,
                          metric: str = "accuracy") -> Path:
    """Grouped bars per task type, one bar per model, 95% bootstrap intervals as error bars."""
    data = accuracy_rows(result, metric)
    _write_csv(csv_path, ["task", "model", metric, "lo", "hi", "n"], data)
    tasks = list(dict.fromkeys(t for t, *_ in data))
    models = [m for m in MODEL_ORDER if any(row[1] == m for row in data)]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(tasks) + 2), 3.8))
    width = 0.8 / max(1, len(models))
    for j, m in enumerate(models):
        xs, ys, err_lo, err_hi = [], [], [], []
        for i, t in enumerate(tasks):
            row = next((r for r in data if r[0] == t and r[1] == m), None)
            if row is None:
                continue
            _, _, v, lo, hi, _ = row
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(v)
            err_lo.append(max(0.0, v - lo))
            err_hi.append(max(0.0, hi - v))
        ax.bar(xs, ys, width=width * 0.95, color=MODEL_COLORS.get(m), label=m,
               yerr=[err_lo, err_hi], capsize=3, ecolor="black")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set(ylabel=metric, ylim=(0, 1.05) if metric == "accuracy" else None,
           title=f"{metric} by task type (95% bootstrap CI)")
    ax.grid(axis="y", alpha=0.3)
    if models:  # below the axes: bars near 1.0 would hide under an inside legend
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(models), fontsize=8, frameon=False)
    _save(fig, png_path)
    return Path(png_path)
