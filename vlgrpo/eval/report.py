"""``reports/evaluate.md``: the evaluation report a person reads, and the one call that writes every output.

    from vlgrpo.eval.report import write_evaluation_outputs
    paths = write_evaluation_outputs(result, root=Path("."), manifest=Path("data/manifest.jsonl"),
                                     train_metrics=Path("reports/train_metrics.jsonl"))
    # -> plots/train_curve.{png,csv}, plots/accuracy_by_task.{png,csv}, reports/evaluate.md,
    #    reports/evaluate.html, reports/evaluate_items.jsonl, reports/evaluate_assets/<item>.png (thumbnails)

``result`` is what :func:`vlgrpo.eval.evaluate.evaluate_models` returns. The report holds a summary table
(metric, each model with its 95% interval, the paired differences), the promotion decision with its
reasons, the figures, and a sample of items: thumbnail, question, reference and each model's answer.

``evaluate.md`` links its pictures by relative path (``../plots/...``, ``evaluate_assets/...``): they show
where the files lie beside it (the project, or an artifact store holding the same folders).
``evaluate.html`` is the same report with every picture embedded (``data:`` URIs): one file that shows
its figures and thumbnails wherever it is opened - a browser, MLflow's artifact viewer, an e-mail.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image

from vlgrpo.data.manifest import resolve_image
from vlgrpo.io import atomic_write_bytes, atomic_write_text

MODEL_ORDER = ("base", "candidate", "champion")
THUMB_PX = 96


def _with_ci(block: Mapping[str, Any] | None, metric: str, signed: bool = False) -> str:
    if not block or not isinstance(block.get(metric), (int, float)):
        return "–"
    v, lo, hi = block[metric], block.get(f"{metric}_lo"), block.get(f"{metric}_hi")
    s = f"{v:+.3f}" if signed else f"{v:.3f}"
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and (lo != v or hi != v):
        s += f" [{lo:+.3f}, {hi:+.3f}]" if signed else f" [{lo:.3f}, {hi:.3f}]"
    return s


def _cell(text: Any) -> str:
    """Markdown-table-safe text: no pipes or newlines."""
    return str(text).replace("|", "\\|").replace("\n", " ").strip() or "∅"


def metric_names(result: Mapping[str, Any]) -> list[str]:
    """Headline metrics in a stable order: primary first, then the rest as the evaluation listed them."""
    names = list(result.get("metrics", []))
    primary = result.get("primary_metric")
    if primary in names:
        names.remove(primary)
        names.insert(0, primary)
    return names


def summary_table(result: Mapping[str, Any]) -> list[str]:
    models = [m for m in MODEL_ORDER if isinstance(result.get(m), Mapping)]
    deltas = [k for k in ("delta_vs_base", "delta_vs_champion") if isinstance(result.get(k), Mapping)]
    head = ["metric"] + models + [f"candidate − {k.split('_vs_')[1]} (paired)" for k in deltas]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric in metric_names(result):
        cells = [metric] + [_with_ci(result[m], metric) for m in models]
        cells += [_with_ci(result[k], metric, signed=True) for k in deltas]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def task_table(result: Mapping[str, Any], metric: str) -> list[str]:
    models = [m for m in MODEL_ORDER if isinstance(result.get(m), Mapping)]
    tasks = sorted({t for m in models for t in result[m].get("by_task", {})})
    if not tasks:
        return []
    lines = [f"| task | n | " + " | ".join(models) + " | candidate − base |", "|" + "---|" * (len(models) + 3)]
    for t in tasks:
        blocks = {m: result[m].get("by_task", {}).get(t) for m in models}
        n = next((b.get("n") for b in blocks.values() if b), 0)
        delta = (result.get("delta_vs_base") or {}).get("by_task", {}).get(t)
        lines.append(f"| {t} | {n} | " + " | ".join(_with_ci(blocks[m], metric) for m in models)
                     + f" | {_with_ci(delta, metric, signed=True)} |")
    return lines


def pick_samples(items: Sequence[Mapping[str, Any]], n: int) -> list[Mapping[str, Any]]:
    """Up to ``n`` items: round-robin over task types, the most telling items first.

    Priority: models disagree on correctness (0), models give different answers (1), all agree (2).
    Each round takes the next item of every task type and orders that round by priority, then manifest
    order, so every task type stays in view and the sample is deterministic.
    """
    def priority(it: Mapping[str, Any]) -> int:
        correct = {v for v in it.get("correct", {}).values() if v is not None}
        answers = {str(a).strip().lower() for a in it.get("answers", {}).values()}
        return 0 if len(correct) > 1 else 1 if len(answers) > 1 else 2

    order = {id(it): i for i, it in enumerate(items)}
    key = lambda it: (priority(it), order[id(it)])  # noqa: E731
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for it in sorted(items, key=key):
        by_task.setdefault(str(it.get("task")), []).append(it)
    queues = list(by_task.values())
    out: list[Mapping[str, Any]] = []
    while len(out) < n and any(queues):
        heads = sorted((q.pop(0) for q in queues if q), key=key)
        out.extend(heads[:n - len(out)])
    return out


def _thumbnail(src: Path, dst: Path) -> bool:
    try:
        with Image.open(src) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except (OSError, ValueError):
        return False  # a missing/unreadable image must not sink the report; the cell says so
    atomic_write_bytes(dst, buf.getvalue())
    return True


def _safe_name(item_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in item_id)[:80] or "item"


def samples_section(samples: Sequence[Mapping[str, Any]], out_path: Path, manifest: Path | None) -> list[str]:
    models = [m for m in MODEL_ORDER if any(m in it.get("answers", {}) for it in samples)]
    if not samples:
        return ["_No items were evaluated._"]
    assets = out_path.parent / f"{out_path.stem}_assets"
    head = ["image", "task", "question", "reference"] + models
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for it in samples:
        img_cell = "–"
        images = it.get("images") or []
        if images and manifest is not None:
            dst = assets / f"{_safe_name(str(it['id']))}.png"
            if _thumbnail(resolve_image(manifest, images[0]), dst):
                rel = os.path.relpath(dst, out_path.parent).replace(os.sep, "/")
                img_cell = f"![{_cell(it['id'])}]({rel})"
            else:
                img_cell = f"(image missing: {_cell(images[0])})"
        ref = it.get("solution") or "; ".join((it.get("references") or [])[:2])
        answers = []
        for m in models:
            ok = it.get("correct", {}).get(m)
            mark = " ✅" if ok is True else " ❌" if ok is False else ""
            answers.append(_cell(it.get("answers", {}).get(m, "–")) + mark)
        lines.append("| " + " | ".join([img_cell, _cell(it.get("task")), _cell(it.get("question")),
                                         _cell(ref)] + answers) + " |")
    return lines


def watch_section(flags: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """What the training watch flagged (sustained KL, collapsed reward variance), worded for the reader."""
    if not flags:
        return []
    lines = ["## Training watch: flagged", ""]
    lines += [f"- **{_cell(f.get('kind', '?'))}**: {_cell(f.get('message', ''))}" for f in flags]
    return lines + [""]


def render_markdown(result: Mapping[str, Any], plots: Mapping[str, Path], out_path: Path,
                    manifest: Path | None, n_samples: int = 12,
                    train_flags: Sequence[Mapping[str, Any]] | None = None) -> str:
    out_path = Path(out_path)
    models = [m for m in MODEL_ORDER if isinstance(result.get(m), Mapping)]
    primary = result.get("primary_metric", "accuracy")
    lines = ["# Evaluation: " + " vs ".join(models), ""]
    lines.append(f"{result.get('n_items', 0)} held-out `{result.get('split', 'test')}` items, greedy decoding"
                 + (f", pass@{result['samples_k']} from {result['samples_k']} sampled answers"
                    if result.get("samples_k") else "")
                 + f"; 95% percentile-bootstrap intervals ({result.get('n_boot', '?')} resamples), paired over "
                   f"the same items for the differences.")
    lines.append("")
    d = result.get("decision")
    if d:
        verdict = "PROMOTE" if d.get("promote") else "DO NOT PROMOTE"
        lines += [f"## Decision: **{verdict}** (candidate against the {d.get('against')})", ""]
        lines += [f"- {r}" for r in d.get("reasons", [])]
        lines.append("")
    lines += watch_section(train_flags)
    lines += ["## Summary", ""] + summary_table(result) + [""]
    tt = task_table(result, primary)
    if tt:
        lines += [f"## {primary} by task type", ""] + tt + [""]
    if plots:
        lines += ["## Figures", ""]
        for title, p in plots.items():
            rel = os.path.relpath(Path(p), out_path.parent).replace(os.sep, "/")
            lines += [f"**{title}**", "", f"![{title}]({rel})", ""]
    samples = pick_samples(result.get("items", []), n_samples)
    lines += [f"## Sample of {len(samples)} items (disagreements first, every task type)", ""]
    lines += samples_section(samples, out_path, manifest) + [""]
    return "\n".join(lines)


def write_markdown_report(result: Mapping[str, Any], plots: Mapping[str, Path], out_path: str | Path,
                          manifest: str | Path | None, n_samples: int = 12,
                          train_flags: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """Write the report (and the sample thumbnails beside it, under ``<stem>_assets/``); returns its path."""
    out_path = Path(out_path)
    text = render_markdown(result, plots, out_path, Path(manifest) if manifest else None, n_samples,
                           train_flags)
    atomic_write_text(out_path, text)
    return out_path


HTML_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #1f2328; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 0.3em 0.6em; vertical-align: top; text-align: left; }
th { background: #f6f8fa; }
img { max-width: 100%; }
td img { max-width: 96px; }
code { background: #f6f8fa; padding: 0 0.25em; border-radius: 3px; }
"""
_IMG_SRC = re.compile(r'(<img\b[^>]*?\bsrc=")([^"]+)(")')
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
         ".webp": "image/webp", ".svg": "image/svg+xml"}


def embed_images(body: str, base_dir: Path) -> tuple[str, list[str]]:
    """Replace each ``<img src="relative/path">`` by a ``data:`` URI of that file (relative to ``base_dir``)
    → (html, the sources that could not be read; those keep their link)."""
    missing: list[str] = []

    def repl(m: re.Match) -> str:
        src = html.unescape(m.group(2))
        if re.match(r"^[a-z][a-z0-9+.-]*:", src, re.I):  # data:, http:, file: ... left as they are
            return m.group(0)
        path = (base_dir / src).resolve()
        mime = _MIME.get(path.suffix.lower())
        try:
            data = path.read_bytes() if mime else None
        except OSError:
            data = None
        if data is None:
            missing.append(src)
            return m.group(0)
        return f"{m.group(1)}data:{mime};base64,{base64.b64encode(data).decode('ascii')}{m.group(3)}"

    return _IMG_SRC.sub(repl, body), missing


def render_html(markdown_text: str, base_dir: str | Path, title: str = "Evaluation report") -> str:
    """The markdown report as one self-contained HTML page: tables rendered, every picture embedded."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)
    body, missing = embed_images(body, Path(base_dir))
    note = "" if not missing else (f"<p><em>{len(missing)} picture(s) could not be embedded: "
                                   f"{html.escape(', '.join(missing[:5]))}</em></p>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{HTML_STYLE}</style></head>\n"
            f"<body>\n{body}{note}</body></html>\n")


def write_html_report(markdown_path: str | Path, out_path: str | Path | None = None) -> Path:
    """Write ``<report>.html`` beside the markdown report (its pictures embedded); returns its path."""
    markdown_path = Path(markdown_path)
    out_path = Path(out_path) if out_path else markdown_path.with_suffix(".html")
    text = markdown_path.read_text(encoding="utf-8")
    first = text.splitlines()[0].lstrip("# ").strip() if text.strip() else "Evaluation report"
    atomic_write_text(out_path, render_html(text, markdown_path.parent, first))
    return out_path


def metrics_only(result: Mapping[str, Any]) -> dict[str, Any]:
    """``result`` without the per-item answers: what ``reports/evaluate.json`` (DVC metrics) holds."""
    return {k: v for k, v in result.items() if k != "items"}


def write_evaluation_outputs(result: Mapping[str, Any], root: str | Path, manifest: str | Path | None,
                             train_metrics: str | Path | None = None, n_samples: int = 12,
                             train_flags: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Path]:
    """Write plots/ (PNG + CSV), reports/evaluate.md, reports/evaluate.html and reports/evaluate_items.jsonl
    under ``root``. ``train_flags``: what the training watch flagged (``reports/train.json``: ``watch``).

    ``reports/evaluate.json`` itself is left to the caller (it adds run ids); use :func:`metrics_only`.
    Returns every written path by name.
    """
    from vlgrpo.eval.plots import plot_accuracy_by_task, plot_training_curves, read_metrics_jsonl

    root = Path(root)
    plots_dir, reports = root / "plots", root / "reports"
    paths: dict[str, Path] = {}
    figures: dict[str, Path] = {}
    if train_metrics is not None and Path(train_metrics).exists():
        rows = read_metrics_jsonl(train_metrics)
        paths["train_curve_png"] = plot_training_curves(rows, plots_dir / "train_curve.png",
                                                        plots_dir / "train_curve.csv")
        paths["train_curve_csv"] = plots_dir / "train_curve.csv"
        figures["Training reward and KL per step"] = paths["train_curve_png"]
    metric = result.get("primary_metric", "accuracy")
    paths["accuracy_png"] = plot_accuracy_by_task(result, plots_dir / "accuracy_by_task.png",
                                                  plots_dir / "accuracy_by_task.csv", metric=metric)
    paths["accuracy_csv"] = plots_dir / "accuracy_by_task.csv"
    figures[f"{metric} by task type, 95% CI"] = paths["accuracy_png"]
    items_path = reports / "evaluate_items.jsonl"
    atomic_write_text(items_path, "".join(json.dumps(it, ensure_ascii=False) + "\n"
                                          for it in result.get("items", [])))
    paths["items"] = items_path
    paths["markdown"] = write_markdown_report(result, figures, reports / "evaluate.md", manifest, n_samples,
                                              train_flags)
    paths["html"] = write_html_report(paths["markdown"])
    return paths
