"""iou / box parsing (Qwen2.5-VL pixels, Qwen3-VL 0-1000) and the synthetic grounding task."""
import json

import pytest

from vlgrpo import rewards as R
from tests.settings import tuned_data
from vlgrpo.config import RewardsConfig
from vlgrpo.data.images import smart_resize
from vlgrpo.data.synthetic import generate
from vlgrpo.rewards import RewardContext


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
        fn = R.setup_rewards(["iou", "accuracy"], RewardContext(RewardsConfig(iou_box_format=fmt),
                                                           pixels=(3136, 12544)))
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
    fn = R.setup_rewards(["iou"], RewardContext(RewardsConfig(iou_box_format="qwen3"), tmp_path, tmp_path / "data"))
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
