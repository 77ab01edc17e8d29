"""soft_overlong (against TRL's), iou / box parsing (Qwen2.5-VL pixels, Qwen3-VL 0-1000), the synthetic
grounding task, and learned reward models (a tiny sequence-classifier the test builds and trains)."""
import json

import pytest
import torch

from vlgrpo import rewards as R
from vlgrpo.config import DataConfig, RewardsConfig
from vlgrpo.data.images import smart_resize
from vlgrpo.data.synthetic import generate
from tests.settings import tuned_data


# ------------------------------------------------------------------------------------------ soft_overlong


@pytest.mark.parametrize("max_len,buffer", [(8, 2), (20, 5), (100, 20)])
def test_soft_overlong_equals_trl(max_len, buffer):
    from trl.rewards import get_soft_overlong_punishment

    lengths = list(range(0, max_len + 4))
    trl = get_soft_overlong_punishment(max_len, buffer)([[1] * n for n in lengths])
    fn = R.resolve_rewards(["soft_overlong"], RewardsConfig(overlong_buffer=buffer, overlong_max_length=max_len))
    ours = fn["soft_overlong"](["q"] * len(lengths), ["x"] * len(lengths), completion_length=lengths)
    assert ours == pytest.approx(trl, abs=1e-12)
    assert min(ours) == -1.0 and ours[0] == 0.0


def test_soft_overlong_defaults_to_train_length_and_needs_lengths():
    fn = R.resolve_rewards(["soft_overlong"], RewardsConfig(overlong_buffer=2), max_completion_length=8)
    out = R.compute_rewards({"soft_overlong": 1.0}, ["q"] * 3, ["a", "b", "c"],
                            {"completion_length": [6, 7, 8]}, rewards=fn)
    assert out.per_reward["soft_overlong"] == [0.0, -0.5, -1.0]
    with pytest.raises(R.RewardError, match="completion_length"):
        R.compute_rewards({"soft_overlong": 1.0}, ["q"], ["a"], {"id": ["x"]}, rewards=fn)


# ---------------------------------------------------------------------------------------------------- iou


@pytest.mark.parametrize("text,box", [
    ("[10, 20, 50, 60]", (10, 20, 50, 60)),
    ('{"bbox_2d": [10, 20, 50, 60], "label": "red square"}', (10, 20, 50, 60)),
    ('```json\n[{"bbox_2d": [10.5, 20, 50, 60], "label": "x"}]\n```', (10.5, 20, 50, 60)),
    ("The box is [[10, 20, 50, 60]].", (10, 20, 50, 60)),
    ("(10,20),(50,60)", (10, 20, 50, 60)),
    ("red", None), ("1 2 3", None), ("", None),
])
def test_parse_box(text, box):
    assert R.parse_box(text) == box


def test_box_iou_by_hand():
    assert R.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert R.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert R.box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert R.box_iou((10, 0, 0, 10), (0, 0, 10, 10)) == 0.0          # inverted box: empty


def test_iou_reward_both_conventions():
    """A 300x200 image: Qwen2.5-VL answers in pixels of the smart_resized image, Qwen3-VL in 0-1000."""
    gold = [60, 40, 150, 120]                                        # pixels of the 300x200 original
    rh, rw = smart_resize(200, 300, 3136, 12544)
    assert (rh, rw) != (200, 300)                                    # the model sees a smaller image
    q25 = [round(v * s) for v, s in zip(gold, (rw / 300, rh / 200, rw / 300, rh / 200))]
    q3 = [round(v * s) for v, s in zip(gold, (1000 / 300, 1000 / 200, 1000 / 300, 1000 / 200))]
    cols = {"solution": [json.dumps(gold)] * 3, "image_size": [[300, 200]] * 3}
    for fmt, right, wrong in (("qwen2.5", q25, q3), ("qwen3", q3, q25)):
        fn = R.resolve_rewards(["iou", "accuracy"], RewardsConfig(iou_box_format=fmt),
                               pixels=(3136, 12544))
        comps = [json.dumps({"bbox_2d": right}), str(wrong), "no idea"]
        out = R.compute_rewards({"iou": 1.0, "accuracy": 0.0}, ["q"] * 3, comps, cols, rewards=fn)
        assert out.per_reward["iou"][0] > 0.9                       # rounding only
        assert out.per_reward["iou"][1] < 0.5 and out.per_reward["iou"][2] == 0.0
        assert out.per_reward["accuracy"] == [1.0, 0.0, 0.0]
    # not a grounding item: iou does not apply, accuracy is the usual exact match
    out = R.compute_rewards({"iou": 1.0, "accuracy": 1.0}, ["q"], ["red"], {"solution": ["red"]})
    assert out.per_reward["iou"] == [None] and out.per_reward["accuracy"] == [1.0]


def test_iou_reads_the_image_size_from_the_file_under_the_manifest_folder(tmp_path):
    from PIL import Image

    (tmp_path / "data/images").mkdir(parents=True)
    Image.new("RGB", (300, 200)).save(tmp_path / "data/images/a.png")
    cols = {"solution": ["[0, 0, 150, 100]"], "images": [["images/a.png"]]}      # no scene, no image_size
    fn = R.resolve_rewards(["iou"], RewardsConfig(iou_box_format="qwen3"), root=tmp_path,
                           image_root=tmp_path / "data")
    assert fn["iou"](["q"], ["[0, 0, 500, 500]"], **cols) == [pytest.approx(1.0)]


def test_grounding_task_answers_score_through_the_registry(tmp_path):
    cfg = tuned_data(num_train=12, num_val=0, num_test=0, task_mix={"ground": 1.0})
    pairs = list(generate(cfg))
    assert all(it.task == "ground" and it.question.startswith("<image>Where is the") for it, _ in pairs)
    items = [it for it, _ in pairs]
    for it, img in pairs:                      # the gold box covers the named object's pixels
        x1, y1, x2, y2 = json.loads(it.solution)
        o = next(o for o in it.scene["objects"] if f"{o['color']} {o['shape']}" in it.question)
        assert img.getpixel((o["x"], o["y"])) == img.getpixel(((x1 + x2) // 2, (y1 + y2) // 2))
        assert 0 <= x1 < x2 <= it.scene["width"] and 0 <= y1 < y2 <= it.scene["height"]
    cols = {"solution": [it.solution for it in items], "scene": [it.scene for it in items],
            "task": [it.task for it in items], "terminated": [True] * len(items)}
    perfect = [it.solution for it in items]               # 112 px canvas: the model sees it unresized
    shifted = [json.dumps([v + 20 for v in json.loads(it.solution)]) for it in items]
    for comps, acc in ((perfect, 1.0), (shifted, None)):
        out = R.compute_rewards({"accuracy": 1.0, "iou": 1.0, "format": 0.1}, ["q"] * len(items), comps, cols)
        assert out.per_reward["format"] == [1.0] * len(items)
        if acc is not None:
            assert out.per_reward["iou"] == [1.0] * len(items) and out.per_reward["accuracy"] == [1.0] * len(items)
        else:
            assert all(v < 1.0 for v in out.per_reward["iou"])
    assert R.compute_rewards({"format": 1.0}, ["q"], ["somewhere left"], {k: v[:1] for k, v in cols.items()}
                             ).per_reward["format"] == [0.0]


# ---------------------------------------------------------------------------------- learned reward model


def _tiny_reward_model(path, train_texts, labels):
    """A 1-layer BERT sequence classifier with a word-level tokenizer, trained a few steps to prefer
    label-1 texts, saved as safetensors + tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = sorted({w for t in train_texts for w in t.lower().replace("?", " ").split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                        model_max_length=64)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=1,
                                                     pad_token_id=0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    enc = tokenizer([t.lower() for t in train_texts], return_tensors="pt", padding=True)
    y = torch.tensor(labels, dtype=torch.float32)
    for _ in range(60):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(**enc).logits[:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return model.eval(), tokenizer


def test_learned_reward_model_scores_in_batches(tmp_path):
    q = "what color is the square? "
    texts = [q + c for c in ("red", "blue", "green", "red", "yellow", "blue")]
    model, tokenizer = _tiny_reward_model(tmp_path / "rm", texts, [1, 0, 0, 1, 0, 0])
    cfg = RewardsConfig(weights={"judge": 1.0}, models={"judge": "rm"}, model_batch_size=3)
    fns = R.resolve_rewards(["judge"], cfg, root=tmp_path)
    comps = ["red", "blue", "green", "yellow", "red square", "a blue one", "red"]
    out = R.compute_rewards({"judge": 1.0}, [q] * len(comps), comps, {}, rewards=fns)
    scores = out.per_reward["judge"]
    # batched (3 per forward, padded) = one text at a time through the model itself
    with torch.no_grad():
        alone = [model(**tokenizer(q + c, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
                 for c in comps]
    assert scores == pytest.approx(alone, abs=1e-5)
    assert scores[0] > max(scores[1], scores[2], scores[3])        # it learned to prefer the right answer
    assert out.total == pytest.approx(scores)


def test_learned_reward_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="rewards.models.judge"):
        R.resolve_rewards(["judge"], RewardsConfig(models={"judge": "missing"}), root=tmp_path)
    with pytest.raises(KeyError, match="already a registered reward"):
        R.resolve_rewards(["accuracy"], RewardsConfig(models={"accuracy": "x"}), root=tmp_path)


def test_vl_judge_sees_image_and_completion_and_scores_in_batches(tmp_path):
    # A local Qwen2.5-VL checkpoint in the hub's layout (tests/families.py) as rewards.models entry: the judge.
    from PIL import Image

    from tests.families import build_family

    words = ["Question:", "Answer:", "Is the answer correct? Answer yes or no.", "What colour is the shape?",
             "red", "blue", "green", "a red one", "yes", "no"]
    build_family("qwen2_5_vl", words, tmp_path / "judge")
    (tmp_path / "img").mkdir()
    Image.new("RGB", (56, 56), (220, 30, 30)).save(tmp_path / "img/red.png")
    Image.new("RGB", (84, 56), (30, 30, 220)).save(tmp_path / "img/blue.png")
    cfg = RewardsConfig(weights={"judge": 1.0}, models={"judge": "judge"}, model_batch_size=3)
    fns = R.resolve_rewards(["judge"], cfg, root=tmp_path, image_root=tmp_path, pixels=(3136, 12544))
    q = "What colour is the shape?"
    comps = ["red", "blue", "green", "red", "a red one", "red", "blue"]
    images = [["img/red.png"]] * 5 + [["img/blue.png"]] * 2
    out = R.compute_rewards({"judge": 1.0}, [q] * 7, comps, {"images": images}, rewards=fns)
    scores = out.per_reward["judge"]
    assert all(0.0 < s < 1.0 for s in scores)
    # batches of 3 (left-padded: two image sizes, answers of different lengths) = one item at a time
    alone = [fns["judge"]([q], [c], images=[im])[0] for c, im in zip(comps, images)]
    assert scores == pytest.approx(alone, abs=1e-5)
    assert fns["judge"]([q] * 7, comps, images=images) == scores                 # deterministic
    assert scores[0] == pytest.approx(scores[3], abs=1e-5)                        # same input, other batch
    # the answer and the image both change the score
    assert min(abs(scores[i] - scores[j]) for i, j in ((0, 1), (0, 2), (1, 2))) > 1e-4
    assert abs(scores[0] - scores[5]) > 1e-4 and abs(scores[1] - scores[6]) > 1e-4
    assert out.total == pytest.approx(scores)
