"""Plots (PNG + CSV for `dvc plots`) and the markdown report, from a hand-built evaluation result."""
from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from vlgrpo.eval.plots import (accuracy_rows, plot_accuracy_by_task, plot_training_curves, read_metrics_jsonl,
                          train_curve_rows)
from vlgrpo.eval.report import metrics_only, pick_samples, write_evaluation_outputs, write_markdown_report


def block(acc, lo, hi, by_task):
    return {"n": 4, "accuracy": acc, "accuracy_lo": lo, "accuracy_hi": hi, "format": 1.0, "format_lo": 1.0,
            "format_hi": 1.0, "by_task": {t: {"n": 2, "accuracy": a, "accuracy_lo": a - 0.1,
                                              "accuracy_hi": a + 0.1} for t, a in by_task.items()}}


def items_row(i, task, sol, base, cand):
    return {"id": f"syn-test-{i}", "task": task, "question": f"What {i}?", "images": [f"img/{i}.png"],
            "solution": sol, "references": [], "answers": {"base": base, "candidate": cand},
            "correct": {"base": base == sol, "candidate": cand == sol}, "scores": {}}


RESULT = {
    "split": "test", "n_items": 4, "primary_metric": "accuracy", "metrics": ["format", "accuracy"],
    "n_boot": 200, "samples_k": 0, "models": ["base", "candidate"],
    "base": block(0.25, 0.0, 0.75, {"count": 0.0, "color": 0.5}),
    "candidate": block(0.75, 0.25, 1.0, {"count": 0.5, "color": 1.0}),
    "delta_vs_base": {"accuracy": 0.5, "accuracy_lo": 0.25, "accuracy_hi": 0.75,
                      "by_task": {"count": {"accuracy": 0.5}, "color": {"accuracy": 0.5}}},
    "decision": {"promote": True, "against": "base", "reasons": ["accuracy: candidate 0.7500 vs base 0.2500"]},
    "items": [items_row(0, "count", "2", "3", "2"), items_row(1, "count", "1", "1", "1"),
              items_row(2, "color", "red", "red", "red"), items_row(3, "color", "blue", "red", "blue|x")],
}


@pytest.fixture
def root(tmp_path):
    (tmp_path / "data" / "img").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (112, 112), (30 * i, 100, 200)).save(tmp_path / "data" / "img" / f"{i}.png")
    (tmp_path / "data" / "manifest.jsonl").write_text("")
    metrics = [{"step": s, "reward": 0.1 * s, "reward_std": 0.05, "kl": 0.01 * s, "loss": 0.0,
                "rewards/accuracy/mean": 0.05 * s, "rewards/format/mean": None} for s in (1, 2, 3)]
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "train_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    return tmp_path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_training_curves_png_and_csv(root):
    rows = read_metrics_jsonl(root / "reports" / "train_metrics.jsonl")
    assert train_curve_rows(rows) == [(1, 0.1, 0.01), (2, 0.2, 0.02), (3, pytest.approx(0.3), 0.03)]
    png = plot_training_curves(rows, root / "plots" / "c.png", root / "plots" / "c.csv")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 400
    assert read_csv(root / "plots" / "c.csv") == [["step", "reward", "kl"], ["1", "0.1", "0.01"],
                                                  ["2", "0.2", "0.02"], ["3", "0.3", "0.03"]]


def test_metrics_stream_errors_name_the_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: not a JSON object line"):
        read_metrics_jsonl(p)


def test_accuracy_by_task_csv_has_every_task_model_and_all(root):
    assert accuracy_rows(RESULT)[:2] == [("color", "base", 0.5, 0.4, 0.6, 2), ("color", "candidate", 1.0, 0.9,
                                                                               1.1, 2)]
    plot_accuracy_by_task(RESULT, root / "plots" / "a.png", root / "plots" / "a.csv")
    rows = read_csv(root / "plots" / "a.csv")
    assert rows[0] == ["task", "model", "accuracy", "lo", "hi", "n"]
    assert rows[-2:] == [["all", "base", "0.25", "0", "0.75", "4"], ["all", "candidate", "0.75", "0.25", "1", "4"]]
    assert len(rows) == 1 + 3 * 2
    with Image.open(root / "plots" / "a.png") as im:
        assert im.format == "PNG"


def test_samples_put_disagreements_first_round_robin_over_tasks():
    picked = pick_samples(RESULT["items"], 3)
    # round 1: item 0 (count: one model right, one wrong) before item 3 (color: different answers, both
    # wrong); round 2: the agreeing items, manifest order
    assert [it["id"] for it in picked] == ["syn-test-0", "syn-test-3", "syn-test-1"]
    assert [it["id"] for it in pick_samples(RESULT["items"], 10)] == [f"syn-test-{i}" for i in (0, 3, 1, 2)]


def test_markdown_report_has_decision_tables_figures_and_thumbnails(root):
    paths = write_evaluation_outputs(RESULT, root, root / "data" / "manifest.jsonl",
                                     root / "reports" / "train_metrics.jsonl", n_samples=4)
    md = paths["markdown"].read_text()
    assert "## Decision: **PROMOTE** (candidate against the base)" in md
    assert "- accuracy: candidate 0.7500 vs base 0.2500" in md
    # primary metric first, with intervals and the paired difference
    assert "| accuracy | 0.250 [0.000, 0.750] | 0.750 [0.250, 1.000] | +0.500 [+0.250, +0.750] |" in md
    assert md.index("| accuracy |") < md.index("| format |")
    assert "| count | 2 | 0.000 [-0.100, 0.100] | 0.500 [0.400, 0.600] | +0.500 |" in md
    assert "![Training reward and KL per step](../plots/train_curve.png)" in md
    assert "![accuracy by task type, 95% CI](../plots/accuracy_by_task.png)" in md
    # each sampled item: thumbnail copied beside the report, relative link, answers with marks; pipes escaped
    assert "![syn-test-3](evaluate_assets/syn-test-3.png) | color | What 3? | blue | red ❌ | blue\\|x ❌ |" in md
    with Image.open(root / "reports" / "evaluate_assets" / "syn-test-3.png") as im:
        assert max(im.size) <= 96
    for p in ("train_curve.png", "train_curve.csv", "accuracy_by_task.png", "accuracy_by_task.csv"):
        assert (root / "plots" / p).stat().st_size > 0
    lines = (root / "reports" / "evaluate_items.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [f"syn-test-{i}" for i in range(4)]


def test_missing_image_does_not_sink_the_report(tmp_path):
    (tmp_path / "manifest.jsonl").write_text("")
    out = write_markdown_report(RESULT, {}, tmp_path / "reports" / "evaluate.md", tmp_path / "manifest.jsonl")
    assert "(image missing: img/3.png)" in out.read_text()


def test_metrics_only_drops_per_item_answers():
    m = metrics_only(RESULT)
    assert "items" not in m and m["candidate"]["accuracy"] == 0.75 and "items" in RESULT


def test_html_report_embeds_every_picture_and_renders_the_tables(root):
    import base64
    import re

    flags = [{"kind": "kl", "message": "KL above train.watch.max_kl 0.5 for 3 steps in a row (steps 2-4)"}]
    paths = write_evaluation_outputs(RESULT, root, root / "data" / "manifest.jsonl",
                                     root / "reports" / "train_metrics.jsonl", n_samples=4, train_flags=flags)
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    assert paths["html"] == root / "reports" / "evaluate.html"
    assert "## Training watch: flagged" in md and "KL above train.watch.max_kl 0.5" in page
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    # one picture per markdown image (2 figures + 4 thumbnails), each a data: URI of that very file
    assert len(srcs) == len(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)) == 6
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    assert (root / "plots" / "train_curve.png").read_bytes() in embedded
    assert (root / "reports" / "evaluate_assets" / "syn-test-3.png").read_bytes() in embedded
    assert "<table>" in page and "<td>blue|x ❌</td>" in page and "could not be embedded" not in page


def test_html_report_keeps_the_link_of_a_picture_it_cannot_read(tmp_path):
    from vlgrpo.eval.report import render_html

    page = render_html("# R\n\n![gone](plots/none.png)\n", tmp_path)
    assert 'src="plots/none.png"' in page and "1 picture(s) could not be embedded: plots/none.png" in page
