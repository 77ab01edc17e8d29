"""Rewards: exact values on hand-made items, strict matching, the registry, plugins and error handling."""
from __future__ import annotations

import math
import string

import pytest

from vlgrpo import rewards as R
from vlgrpo.data.answers import answers_match, normalize_answer
from vlgrpo.config import RewardsConfig
from vlgrpo.rewards import registry
from vlgrpo.rewards.answers import format_reward
from vlgrpo.rewards.captions import caption_facts, detail_f1, detail_f1_score, make_reference
from vlgrpo.rewards.learned import make_clip_score
from vlgrpo.rewards.text import make_fluency

# Two red circles and a blue square.
SCENE = {"width": 112, "height": 112, "background": "gray", "objects": [
    {"shape": "circle", "color": "red", "size": 30, "x": 20, "y": 20},
    {"shape": "circle", "color": "red", "size": 30, "x": 70, "y": 20},
    {"shape": "square", "color": "blue", "size": 30, "x": 50, "y": 80}]}


def cols(n: int, **kw):
    base = {"id": [f"it{i}" for i in range(n)], "task": ["color"] * n, "solution": ["red"] * n,
            "references": [[] for _ in range(n)], "scene": [SCENE] * n, "images": [[] for _ in range(n)],
            "terminated": [True] * n}
    base.update(kw)
    return base


# ------------------------------------------------------------------------------------------ answers


@pytest.mark.parametrize("raw,norm", [
    ("Red", "red"), ("  red. ", "red"), ("The red", "red"), ("a circle!", "circle"), ("Two", "2"),
    ("twenty", "20"), ("02", "2"), ("Yes.", "yes"), ("YES", "yes"), ("no!", "no"), ("Nope", "no"),
    ("red circle", "red circle"), ("2 or 3", "2 or 3"), ("yes it is", "yes it is"), ("", ""), (None, ""),
    ("the  big\n red", "big red"), ("'blue'", "blue")])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_answers_match_is_strict():
    assert answers_match("Two.", "2") and answers_match("the Circle", "circle")
    assert not answers_match("red circle", "red")
    assert not answers_match("2 or 3", "2")
    assert not answers_match("redish", "red")
    assert not answers_match("", "")


# ------------------------------------------------------------------------------------------ accuracy/format


def test_accuracy_exact_values_and_no_substring_credit():
    comps = ["Red.", "red circle", "the red", "blue", "2 or 3", "Two", "yes", "a caption"]
    sols = ["red", "red", "red", "red", "2", "2", "Yes", ""]
    tasks = ["color"] * 4 + ["count"] * 2 + ["exists", "caption"]
    got = R.accuracy(["q"] * 8, comps, **cols(8, solution=sols, task=tasks))
    assert got == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, None]


def test_format_reward():
    comps = ["red", "a red one", "it is red really", "", "red", "red\nblue", "two red circles and a square",
             "two red circles\n\nand more"]
    tasks = ["color"] * 6 + ["caption"] * 2
    sols = ["red"] * 6 + ["", ""]
    term = [True, True, True, True, False, True, True, True]
    got = format_reward(["q"] * 8, comps, **cols(8, task=tasks, solution=sols, terminated=term))
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]


# ------------------------------------------------------------------------------------------ detail_f1


def test_caption_facts_parse_counts_mentions_and_negation():
    assert caption_facts("There are three shapes: two red circles and a blue square") == {
        ("count", None, None, 3), ("count", "red", "circle", 2), ("count", "blue", "square", 1),
        ("color", "red"), ("color", "blue"), ("shape", "circle"), ("shape", "square")}
    assert caption_facts("no green triangles") == {("count", "green", "triangle", 0)}
    assert caption_facts("4 crosses, red red red") == {("count", None, "cross", 4), ("color", "red"),
                                                          ("shape", "cross")}


def test_detail_f1_exact_values():
    f1 = lambda t: detail_f1_score(t, SCENE)  # noqa: E731
    assert f1("two red circles and a blue square") == 1.0
    # 4 of 6 stated facts true; covers 4 of the 6 scene facts -> P = R = 2/3.
    assert f1("two red circles and a green square") == pytest.approx(2 / 3, abs=1e-12)
    # count(red circle)=1 false, red and circle true: P = 2/3, R = 2/6 -> F1 = 4/9.
    assert f1("a red circle") == pytest.approx(4 / 9, abs=1e-12)
    # A true total count is extra precision, not recall; "no green triangles" is a true fact.
    assert f1("three shapes") == 0.0
    assert f1("no green triangles, two red circles") == pytest.approx(2 * 1 * 0.5 / 1.5, abs=1e-12)
    # Listing every colour and shape games recall, not precision.
    assert f1("red blue green yellow circle square triangle") == pytest.approx(
        2 * (4 / 7) * (4 / 6) / (4 / 7 + 4 / 6), abs=1e-12)
    assert f1("") == 0.0


def test_detail_f1_applies_only_to_captions_with_a_scene():
    got = detail_f1(["q"] * 3, ["two red circles and a blue square"] * 3,
                      **cols(3, task=["caption", "caption", "color"], solution=["", "", "red"],
                             scene=[SCENE, None, SCENE]))
    assert got == [1.0, None, None]


# ------------------------------------------------------------------------------------------ reference


def test_reference_cider_d_exact_values():
    a, b = "two red circles and a blue square", "a green triangle"
    got = R.get_reward("reference")(["q"] * 3, [a, b, "purple cross"],
                                   **cols(3, task=["caption"] * 3, solution=[""] * 3,
                                          references=[[a], [b], [a]]))
    assert got[0] == pytest.approx(10.0, abs=1e-9)   # identical to its only reference
    assert got[1] == pytest.approx(7.5, abs=1e-9)    # identical, but 3 words: no 4-gram -> 3/4 of 10
    assert got[2] == 0.0


def test_reference_matches_pycocoevalcap_on_distinct_images():
    from pycocoevalcap.cider.cider import Cider
    refs = [["two red circles and a blue square", "a blue square and two red circles"],
            ["a green triangle", "one green triangle"], ["three yellow crosses"]]
    hyps = ["two red circles and a square", "a green circle", "three crosses"]
    _, expected = Cider().compute_score({i: r for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)})
    got = R.get_reward("reference")(["q"] * 3, hyps, **cols(3, references=refs, solution=[""] * 3))
    assert got == pytest.approx(list(expected), abs=1e-12)


def test_reference_counts_each_image_once_and_skips_items_without_references():
    refs = [["two red circles and a blue square"], ["a green triangle"]]
    hyps = ["two red circles", "a green square"]
    single = R.get_reward("reference")(["q"] * 2, hyps, **cols(2, references=refs, solution=[""] * 2))
    grouped = R.get_reward("reference")(["q"] * 5, [hyps[0]] * 3 + [hyps[1], "x"],
                                        **cols(5, references=[refs[0]] * 3 + [refs[1], []], solution=[""] * 5))
    assert grouped[:4] == pytest.approx([single[0]] * 3 + [single[1]], abs=1e-12)
    assert grouped[4] is None
    fixed = make_reference(corpus=refs)
    assert fixed.__name__ == "reference"
    assert fixed(["q"], [hyps[0]], **cols(1, references=[refs[0]])) == pytest.approx([single[0]], abs=1e-12)


# ------------------------------------------------------------------------------------------ fluency


def test_fluency_exact_values():
    fl = make_fluency(min_words=1, max_words=30)
    many = " ".join(f"w{i}" for i in range(40))
    got = fl(["q"] * 5, ["two red circles", "red red red", "red red red", many, ""],
             **cols(5, terminated=[True, True, False, True, True]))
    assert got == pytest.approx([1.0, 0.5, 0.25, 0.75, 0.0], abs=1e-12)
    assert make_fluency(min_words=4, max_words=8)(["q"], ["a red circle"], **cols(1)) == [0.75]
    assert make_fluency().__name__ == "fluency"
    with pytest.raises(ValueError, match="min_words"):
        make_fluency(min_words=5, max_words=2)


# ------------------------------------------------------------------------------------------ clip_score


def _tiny_clip(path):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,:":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)


def test_clip_score_is_the_cosine_of_a_local_clip(tmp_path):
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    _tiny_clip(tmp_path / "clip")
    (tmp_path / "img").mkdir()
    Image.new("RGB", (112, 112), (220, 40, 40)).save(tmp_path / "img" / "r.png")
    Image.new("RGB", (112, 112), (40, 80, 220)).save(tmp_path / "img" / "b.png")
    texts = ["a red square", "blue", "a red square " * 20, "no image"]
    images = [["img/r.png"], ["img/r.png"], ["img/b.png"], []]
    fn = make_clip_score(tmp_path / "clip", root=tmp_path)
    assert fn.__name__ == "clip_score"
    got = fn(["q"] * 4, texts, **cols(4, images=images))
    assert got[3] is None

    # Oracle: the model's own forward pass, logits = exp(logit_scale) * cosine.
    model = CLIPModel.from_pretrained(tmp_path / "clip").eval()
    proc = CLIPProcessor.from_pretrained(tmp_path / "clip")
    for i in range(3):
        with Image.open(tmp_path / images[i][0]) as im:
            inp = proc(text=[texts[i]], images=[im.convert("RGB")], return_tensors="pt", truncation=True,
                       max_length=32)
        with torch.no_grad():
            out = model(**inp)
        expected = (out.logits_per_image[0, 0] / model.logit_scale.exp()).item()
        assert got[i] == pytest.approx(expected, abs=1e-5)
        assert -1.0 <= got[i] <= 1.0
    assert got[0] != pytest.approx(got[1], abs=1e-6)

    with pytest.raises(FileNotFoundError, match="clip_model"):
        make_clip_score(tmp_path / "missing")


# ------------------------------------------------------------------------------------------ registry


def test_every_registered_reward_resolves_and_runs():
    assert {"accuracy", "format", "detail_f1", "reference", "fluency", "iou", "soft_overlong",
            "clip_score"} <= set(R.REWARDS)
    comps = ["red", "two red circles and a blue square", "[10, 10, 40, 40]"]
    c = cols(3, task=["color", "caption", "ground"], solution=["red", "", "[12, 10, 40, 40]"],
             references=[[], [comps[1]], []], completion_length=[1, 8, 12])
    ctx = R.RewardContext(max_completion_length=10)
    # Built-ins only: plugins registered by other tests in this process (e.g. a NaN reward) are theirs;
    # clip_score needs a CLIP checkpoint (test_clip_score_is_the_cosine_of_a_local_clip).
    builtins = [n for n in R.REWARDS if not registry.is_plugin(n) and n != "clip_score"]
    for name in sorted(builtins):
        fn = R.get_reward(name, ctx)
        vals = fn(["q"] * 3, comps, **c)
        assert len(vals) == 3 and all(v is None or math.isfinite(v) for v in vals), name
        assert any(v is not None for v in vals), name


def test_setup_rewards_builds_configured_rewards(tmp_path):
    cfg = RewardsConfig(fluency_min_words=4, fluency_max_words=8)
    fns = R.setup_rewards(["accuracy", "fluency"], R.RewardContext(cfg))
    assert fns["accuracy"](["q"] * 2, ["Red.", "blue"], **cols(2)) == [1.0, 0.0]
    assert fns["fluency"](["q"], ["a red circle"], **cols(1)) == [0.75]
    with pytest.raises(KeyError, match="clip_model"):
        R.setup_rewards(["clip_score"], R.RewardContext(cfg))
    with pytest.raises(KeyError, match="registered: accuracy"):
        R.get_reward("nope")
    with pytest.raises(KeyError, match="unknown reward 'nope'; registered: accuracy"):
        R.setup_rewards(["accuracy", "nope"], R.RewardContext(cfg))


def test_a_plugin_factory_gets_the_context(restore_registry):
    @R.register_factory("under_limit")
    def under_limit_factory(ctx):
        limit = ctx.max_completion_length // 2

        def under_limit(prompts, completions, **columns):
            return [float(n <= limit) for n in columns["completion_length"]]
        return under_limit

    fns = R.setup_rewards(["under_limit"], R.RewardContext(max_completion_length=8))
    out = R.compute_rewards({"under_limit": 1.0}, ["q"] * 2, ["a", "b"], {"completion_length": [4, 5]},
                            rewards=fns)
    assert out.total == [1.0, 0.0]
    with pytest.raises(ValueError, match="already registered"):
        R.register("under_limit")(lambda p, c, **k: [0.0] * len(c))


def test_register_refuses_a_different_function_under_a_taken_name(restore_registry):
    with pytest.raises(ValueError, match="already registered"):
        R.register("accuracy")(lambda prompts, completions, **kw: [1.0] * len(completions))
    with pytest.raises(ValueError, match="reward name"):
        R.register("bad name")


def test_load_plugins(tmp_path, restore_registry):
    good = tmp_path / "my_rewards.py"
    good.write_text("from vlgrpo.rewards import register\n\n"
                    "@register('length_penalty')\n"
                    "def length_penalty(prompts, completions, **columns):\n"
                    "    return [-len(c.split()) / 10 for c in completions]\n")
    assert R.load_plugins([good]) == ["length_penalty"]
    assert R.load_plugins([good]) == ["length_penalty"]   # reloading the same file is fine
    out = R.compute_rewards({"accuracy": 1.0, "length_penalty": 1.0}, ["q"] * 2, ["red", "a red one"], cols(2))
    assert out.per_reward["length_penalty"] == [-0.1, -0.3]
    assert out.total == pytest.approx([0.9, -0.3])   # "a red one" is not "red": strict

    broken = tmp_path / "broken.py"
    broken.write_text("from vlgrpo.rewards import register\n@register('half')\ndef f(p, c, **k): return []\n"
                      "raise RuntimeError('plugin init failed')\n")
    with pytest.raises(R.PluginError, match=r"broken\.py: RuntimeError: plugin init failed"):
        R.load_plugins([broken])
    assert "half" not in R.REWARDS
    (tmp_path / "syntax.py").write_text("def f(:\n")
    with pytest.raises(R.PluginError, match=r"syntax\.py: SyntaxError"):
        R.load_plugins([tmp_path / "syntax.py"])
    with pytest.raises(R.PluginError, match="nothere.py: file not found"):
        R.load_plugins([tmp_path / "nothere.py"])


# ------------------------------------------------------------------------------------------ combine / errors


def test_combine_ignores_none():
    assert R.combine({"a": [1.0, None, 0.0], "b": [0.5, 0.5, None]}, {"a": 1.0, "b": 0.2}) == pytest.approx(
        [1.1, 0.1, 0.0])
    with pytest.raises(KeyError, match="c"):
        R.combine({"a": [1.0]}, {"a": 1.0, "c": 1.0})


def _flaky(prompts, completions, **columns):
    return [1 / 0 if i == "bad" else 1.0 for i in columns["id"]]


def test_on_error_raise_names_reward_and_item(restore_registry):
    R.register("flaky")(_flaky)
    c = cols(3, id=["ok1", "bad", "ok2"])
    with pytest.raises(R.RewardError, match=r"'flaky' failed on item bad: ZeroDivisionError"):
        R.compute_rewards({"flaky": 1.0}, ["q"] * 3, ["a", "b", "c"], c)
    out = R.compute_rewards({"flaky": 1.0, "accuracy": 1.0}, ["q"] * 3, ["red", "red", "blue"], c,
                            on_error="skip")
    assert out.per_reward["flaky"] == [1.0, None, 1.0]
    assert out.total == [2.0, 1.0, 1.0]


def test_nan_and_wrong_length_are_errors(restore_registry):
    R.register("nan_reward")(lambda prompts, completions, **k: [0.0, float("nan")])
    R.register("short_reward")(lambda prompts, completions, **k: [0.0])
    c = cols(2, id=["x1", "x2"])
    for mode in ("raise", "skip"):
        with pytest.raises(R.RewardError, match=r"'nan_reward' returned nan for item x2"):
            R.compute_rewards({"nan_reward": 1.0}, ["q"] * 2, ["a", "b"], c, on_error=mode)
    with pytest.raises(R.RewardError, match=r"'short_reward' returned 1 values for 2 completions"):
        R.compute_rewards({"short_reward": 1.0}, ["q"] * 2, ["a", "b"], c)


def test_batch_only_failure_is_reported_in_raise_mode(restore_registry):
    R.register("batchy")(lambda prompts, completions, **k: [1.0] * len(completions) if len(completions) == 1 else 1 / 0)
    c = cols(2, id=["x1", "x2"])
    with pytest.raises(R.RewardError, match=r"'batchy' failed on the batch of items x1..x2"):
        R.compute_rewards({"batchy": 1.0}, ["q"] * 2, ["a", "b"], c)
    assert R.compute_rewards({"batchy": 1.0}, ["q"] * 2, ["a", "b"], c, on_error="skip").total == [1.0, 1.0]


def test_setup_rewards_takes_paths_under_the_root_and_images_under_the_manifest(tmp_path, monkeypatch,
                                                                                 restore_registry):
    """Training and evaluation share this set-up: plugin files and the CLIP folder are relative to the project
    root whatever the current directory, the images column relative to the manifest's folder."""
    from PIL import Image

    from vlgrpo.config import RewardsConfig

    root = tmp_path / "proj"
    (root / "data" / "img").mkdir(parents=True)
    _tiny_clip(root / "models" / "clip")
    Image.new("RGB", (64, 64), (220, 40, 40)).save(root / "data" / "img" / "r.png")
    (root / "plug.py").write_text("from vlgrpo.rewards import register\n\n@register('always_one')\n"
                                  "def always_one(prompts, completions, **columns):\n"
                                  "    return [1.0] * len(completions)\n")
    rcfg = RewardsConfig(weights={"always_one": 1.0, "clip_score": 1.0}, plugins=("plug.py",),
                         clip_model="models/clip")
    monkeypatch.chdir(tmp_path)                       # not the project root
    fns = R.setup_rewards(["always_one", "clip_score"], R.RewardContext(rcfg, root, root / "data"))
    assert fns["always_one"](["q"], ["a"]) == [1.0]
    (score,) = fns["clip_score"](["q"], ["a red square"], **cols(1, images=[["img/r.png"]]))
    assert -1.0 <= score <= 1.0
