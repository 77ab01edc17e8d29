"""Label-preserving augmentation (vlgrpo.data.augment): objects never leave the frame, hue never changes."""
import colorsys

import numpy as np
import pytest

from vlgrpo.data import augment
from vlgrpo.data.manifest import Item
from vlgrpo.data.synthetic import generate
from tests.settings import tuned_data


@pytest.fixture(scope="module")
def pairs():
    return list(generate(tuned_data(num_train=40, num_val=0, num_test=0, seed=5)))


def test_crop_box_always_contains_the_objects():
    rng = np.random.default_rng(0)
    keep = (30.2, 10.0, 80.7, 101.5)
    for _ in range(500):
        l, t, r, b = augment.safe_crop_box((112, 112), keep, rng)
        assert l <= 30 and t <= 10 and r >= 81 and b >= 102
        assert (112 - (r - l)) <= int(0.2 * 112) and (112 - (b - t)) <= int(0.2 * 112)
    # objects touching every edge: nothing may be cut
    assert augment.safe_crop_box((112, 112), (0, 0, 112, 112), rng) == (0, 0, 112, 112)


def test_count_items_keep_every_object(pairs):
    counted = 0
    for it, img in pairs:
        if it.task not in ("count", "exists"):
            continue
        counted += 1
        keep = augment.objects_bbox(it.scene, img.size)
        rng = np.random.default_rng(1)
        box = augment.safe_crop_box(img.size, keep, np.random.default_rng(1))
        assert box[0] <= keep[0] and box[1] <= keep[1] and box[2] >= keep[2] and box[3] >= keep[3]
        out = augment.augment_image(img, it, rng)
        assert out.size == img.size                    # same visual-token count
    assert counted >= 5


def test_hue_is_preserved_at_object_centres(pairs):
    for it, img in pairs[:15]:
        out = augment.augment_image(img, it, np.random.default_rng(2))
        box = augment.safe_crop_box(img.size, augment.objects_bbox(it.scene, img.size), np.random.default_rng(2))
        for o in it.scene["objects"]:
            # where the object centre lands after crop + resize back
            x = (o["x"] - box[0]) * img.size[0] / (box[2] - box[0])
            y = (o["y"] - box[1]) * img.size[1] / (box[3] - box[1])
            before = colorsys.rgb_to_hsv(*[c / 255 for c in img.getpixel((o["x"], o["y"]))])
            after = colorsys.rgb_to_hsv(*[c / 255 for c in out.getpixel((int(x), int(y)))])
            if before[1] > 0.2:                         # chromatic colours: hue within 0.03 turns (~11°)
                d = abs(before[0] - after[0])
                assert min(d, 1 - d) < 0.03, (it.id, o, before, after)


def test_no_scene_graph_no_crop():
    from PIL import Image
    img = Image.new("RGB", (64, 64), (10, 200, 30))
    img.putpixel((0, 0), (255, 0, 0))
    item = Item(id="x", split="train", task="caption", question="<image>Describe.", images=["a.png"])
    out = augment.augment_image(img, item, np.random.default_rng(0))
    r, g, b = out.getpixel((0, 0))
    assert r > g and r > b                              # the corner pixel is still there: not cropped


def test_deterministic_given_rng(pairs):
    it, img = pairs[0]
    a = augment.augment_image(img, it, np.random.default_rng(7))
    b = augment.augment_image(img, it, np.random.default_rng(7))
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != augment.augment_image(img, it, np.random.default_rng(8)).tobytes()
