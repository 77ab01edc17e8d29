"""Learned reward models: a tiny sequence-classifier the test builds and trains, and a tiny Qwen-VL judge."""
import pytest
import torch

from vlgrpo import rewards as R
from vlgrpo.config import RewardsConfig
from vlgrpo.rewards import RewardContext


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
    fns = R.setup_rewards(["judge"], RewardContext(cfg, tmp_path))
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
        R.setup_rewards(["judge"], RewardContext(RewardsConfig(models={"judge": "missing"}), tmp_path))
    with pytest.raises(KeyError, match="already a registered reward"):
        R.setup_rewards(["accuracy"], RewardContext(RewardsConfig(models={"accuracy": "x"}), tmp_path))


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
    fns = R.setup_rewards(["judge"], RewardContext(cfg, tmp_path, tmp_path, (3136, 12544)))
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
