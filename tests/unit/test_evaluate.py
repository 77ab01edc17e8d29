"""Evaluation metrics on hand-made answers with known values, then the whole loop on the tiny Qwen2.5-VL."""
from __future__ import annotations

import json

import pytest

from vlgrpo.data.answers import answers_match
from vlgrpo.config import TinyModelConfig
from vlgrpo.data.manifest import Item, write_manifest
from vlgrpo.eval.evaluate import (evaluate_models, held_out_items, paired_deltas_by_task, pass_at_k,
                             score_completions, summarize_by_task)
from vlgrpo.model.decoding import Completion
from tests.settings import tuned_config, tuned_data

CFG = tuned_config({"rewards": {"weights": {"accuracy": 1.0, "format": 0.1}},
                        "evaluate": {"bootstrap": 200, "seed": 0}})


def item(i, task, solution, references=()):
    return Item(id=f"t{i}", split="test", task=task, question=f"<image>q{i}?", images=[f"img/t{i}.png"],
                solution=solution, references=list(references))


ITEMS = [item(0, "count", "2"), item(1, "color", "red"), item(2, "shape", "circle"),
         item(3, "caption", "", ["a red circle"])]


def comp(text, n_tokens, terminated=True):
    return Completion(text=text, token_ids=list(range(n_tokens)), terminated=terminated)


# "two" == "2" (number words normalise); "blue" is wrong; "circle" is right but cut at the length limit;
# the caption repeats itself ("a red circle and a red circle": 4 distinct bigrams of 6).
CANDIDATE = [comp("two", 2), comp("blue", 2), comp("circle", 8, terminated=False),
             comp("a red circle and a red circle", 8)]
BASE = [comp("3", 2), comp("blue", 2), comp("square", 2), comp("a red circle", 4)]


def test_scores_per_item_are_the_known_values():
    recs = score_completions(ITEMS, CANDIDATE, CFG)
    assert [r["accuracy"] for r in recs] == [1.0, 0.0, 1.0, None]      # caption: not applicable
    assert [r["format"] for r in recs] == [1.0, 1.0, 0.0, 1.0]          # unterminated -> 0
    assert [r["fluency"] for r in recs] == pytest.approx([1.0, 1.0, 0.5, 4 / 6])
    assert [r["reward"] for r in recs] == pytest.approx([1.1, 0.1, 1.0, 0.1])  # 1*acc + 0.1*format
    assert [r["completion_length"] for r in recs] == [2.0, 2.0, 8.0, 8.0]
    assert [r["terminated"] for r in recs] == [1.0, 1.0, 0.0, 1.0]


def test_summary_means_counts_and_task_breakdown():
    recs = score_completions(ITEMS, CANDIDATE, CFG)
    metrics = ["accuracy", "format", "fluency", "reward", "completion_length", "terminated"]
    s = summarize_by_task([it.task for it in ITEMS], recs, metrics, n_boot=200, seed=0)
    assert s["n"] == 4
    assert s["accuracy"] == pytest.approx(2 / 3) and s["accuracy_n"] == 3   # only 3 items have an answer
    assert s["accuracy_lo"] <= 2 / 3 <= s["accuracy_hi"]
    assert s["format"] == 0.75 and "format_n" not in s
    assert s["reward"] == pytest.approx(2.3 / 4)
    assert s["completion_length"] == 5.0
    assert s["fluency"] == pytest.approx((1 + 1 + 0.5 + 4 / 6) / 4)
    assert sorted(s["by_task"]) == ["caption", "color", "count", "shape"]
    assert s["by_task"]["count"] == {**s["by_task"]["count"], "n": 1, "accuracy": 1.0, "accuracy_lo": 1.0,
                                     "accuracy_hi": 1.0}
    assert "accuracy" not in s["by_task"]["caption"]                        # never NaN, just absent
    assert s["by_task"]["caption"]["fluency"] == pytest.approx(4 / 6)


def test_paired_deltas_are_exact_differences_on_the_same_items():
    tasks = [it.task for it in ITEMS]
    cand = score_completions(ITEMS, CANDIDATE, CFG)
    base = score_completions(ITEMS, BASE, CFG)
    assert [r["accuracy"] for r in base] == [0.0, 0.0, 0.0, None]
    d = paired_deltas_by_task(tasks, cand, base, ["accuracy", "format", "completion_length"], 200, 0)
    assert d["accuracy"] == pytest.approx(2 / 3)                 # (1-0 + 0-0 + 1-0) / 3
    assert d["format"] == pytest.approx(-0.25)                   # (0 + 0 - 1 + 0) / 4
    assert d["completion_length"] == pytest.approx((0 + 0 + 6 + 4) / 4)
    assert d["by_task"]["color"]["accuracy"] == 0.0
    assert d["by_task"]["color"]["accuracy_lo"] == d["by_task"]["color"]["accuracy_hi"] == 0.0
    assert "accuracy" not in d["by_task"]["caption"]


def test_pass_at_k_counts_an_item_solved_by_any_sample():
    sampled = [comp("3", 2), comp("two", 2),          # second sample right
               comp("green", 2), comp("yellow", 2),    # none right
               comp("circle", 2), comp("circle", 2),   # both right
               comp("a", 2), comp("b", 2)]             # caption: n/a
    assert pass_at_k(ITEMS, sampled, 2) == [1.0, 0.0, 1.0, None]
    with pytest.raises(ValueError, match="8 sampled completions for 4 items x k=3"):
        pass_at_k(ITEMS, sampled, 3)


def test_score_completions_refuses_misaligned_lists():
    with pytest.raises(ValueError, match="3 completions for 4 items"):
        score_completions(ITEMS, CANDIDATE[:3], CFG)


# ------------------------------------------------------------------------------ on the tiny Qwen2.5-VL


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from vlgrpo.data.synthetic import generate
    from vlgrpo.model.tiny_model import build_tiny

    root = tmp_path_factory.mktemp("evaluate")
    (root / "img").mkdir()
    items = []
    for it, img in generate(tuned_data(num_train=2, num_val=0, num_test=10)):
        rel = f"img/{it.id}.png"
        img.save(root / rel)
        it.images = [rel]
        items.append(it)
    write_manifest(root / "manifest.jsonl", items)
    model, processor = build_tiny([t for it in items for t in (it.question, it.solution)], TinyModelConfig(), 0)
    return root, model, processor


def test_evaluate_models_end_to_end_identical_models(tiny_setup):
    root, model, processor = tiny_setup
    cfg = tuned_config({"evaluate": {"bootstrap": 200, "samples_k": 2, "max_items": 8, "batch_size": 4,
                                         "max_new_tokens": 4, "guard_metrics": {"format": 0.05}}})
    loads = []

    def loader(name):
        def load():
            loads.append(name)
            return model, processor
        return load

    res = evaluate_models(cfg, root / "manifest.jsonl",
                          {"base": loader("base"), "candidate": loader("candidate"), "champion": None},
                          progress=False, root=root)
    assert loads == ["base", "candidate"]                     # no champion loader: not evaluated
    assert res["n_items"] == 8 and res["models"] == ["base", "candidate"]
    assert "champion" not in res and "delta_vs_champion" not in res
    assert json.loads(json.dumps(res)) == res                 # JSON-able as it is, no NaN

    items = held_out_items(root / "manifest.jsonl", 8)
    rows = res["items"]
    assert [r["id"] for r in rows] == [it.id for it in items]
    # accuracy = strict matches of the greedy answers, recomputed independently
    correct = [answers_match(r["answers"]["candidate"], it.solution) for r, it in zip(rows, items)]
    assert res["candidate"]["accuracy"] == pytest.approx(sum(correct) / len(correct))
    assert all(r["scores"]["candidate"]["completion_length"] <= 4 for r in rows)
    assert "pass_at_2" in res["candidate"]
    # same model, greedy decoding: identical answers, paired differences exactly zero, no promotion on a tie
    assert [r["answers"]["base"] for r in rows] == [r["answers"]["candidate"] for r in rows]
    assert res["delta_vs_base"]["accuracy"] == 0.0
    assert res["delta_vs_base"]["accuracy_lo"] == res["delta_vs_base"]["accuracy_hi"] == 0.0
    assert res["delta_vs_base"]["format"] == 0.0
    assert res["decision"]["promote"] is False and res["decision"]["against"] == "base"
    assert res["candidate"]["items_per_s"] > 0
    assert set(res["candidate"]["by_task"]) == {it.task for it in items}


def test_champion_becomes_the_bar(tiny_setup):
    root, model, processor = tiny_setup
    cfg = tuned_config({"evaluate": {"bootstrap": 100, "max_items": 3, "max_new_tokens": 2}})
    same = lambda: (model, processor)  # noqa: E731
    res = evaluate_models(cfg, root / "manifest.jsonl", {"base": same, "candidate": same, "champion": same},
                          progress=False, root=root)
    assert res["models"] == ["base", "candidate", "champion"]
    assert res["delta_vs_champion"]["format"] == 0.0
    assert res["decision"]["against"] == "champion"


def test_unknown_primary_metric_fails_before_loading_any_model(tiny_setup):
    root, *_ = tiny_setup
    cfg = tuned_config({"evaluate": {"primary_metric": "bleu"}})

    def never():
        raise AssertionError("a model was loaded although the config was wrong")

    with pytest.raises(ValueError, match="evaluate.primary_metric 'bleu' is not measured"):
        evaluate_models(cfg, root / "manifest.jsonl", {"base": never, "candidate": never}, progress=False,
                        root=root)


def test_no_test_split_is_a_clear_error(tmp_path):
    write_manifest(tmp_path / "m.jsonl", [Item("a", "train", "count", "<image>q", ["x.png"], "1")])
    with pytest.raises(ValueError, match=r"m.jsonl: no items with split 'test'"):
        held_out_items(tmp_path / "m.jsonl", None)


def test_mean_sampled_reward_is_the_mean_total_of_seeded_samples(tiny_setup):
    import torch

    from vlgrpo.eval.evaluate import mean_sampled_reward
    from vlgrpo.model.decoding import Decoding, generate_answers

    root, model, processor = tiny_setup
    cfg = tuned_config({"train": {"max_completion_length": 3, "seed": 5}})
    items = held_out_items(root / "manifest.jsonl", 3)
    got = mean_sampled_reward(model, processor, items, root, cfg, samples=2)
    assert got == mean_sampled_reward(model, processor, items, root, cfg, samples=2)
    torch.manual_seed(5)
    comps = generate_answers(model, processor, items, root, Decoding(16, 3, cfg.data.min_pixels, cfg.data.max_pixels,
                                                                     do_sample=True, num_return_sequences=2))
    recs = score_completions([it for it in items for _ in range(2)], comps, cfg)
    assert got == pytest.approx(sum(r["reward"] for r in recs) / 6)
