"""The synthetic scene generator: determinism, split sizes, task mix, answers that agree with the scene."""
from __future__ import annotations

import itertools
import re
from collections import Counter

import numpy as np
import pytest

from vlgrpo.data.answers import WORD_TO_DIGIT
from vlgrpo.config import DataConfig
from vlgrpo.data.manifest import IMAGE_TAG
from vlgrpo.data.synthetic import (COLORS, MIN_SEPARATION, PLURALS, SceneError, count_objects, generate,
                                   make_item, render)
from tests.settings import tuned_data, tuned_synthetic

ALL_TASKS = {"count": 1.0, "color": 1.0, "shape": 1.0, "exists": 1.0, "caption": 1.0}
SINGULAR = {p: s for s, p in PLURALS.items()}


def _cfg(**kw) -> DataConfig:
    base = dict(num_train=120, num_val=20, num_test=30, task_mix=ALL_TASKS)
    base.update(kw)
    return tuned_data(**base)


@pytest.fixture(scope="module")
def items():
    return list(generate(_cfg()))


def test_same_seed_gives_identical_items_and_image_bytes():
    a = list(generate(_cfg(num_train=30, num_val=5, num_test=5)))
    b = list(generate(_cfg(num_train=30, num_val=5, num_test=5)))
    assert [it.to_json() for it, _ in a] == [it.to_json() for it, _ in b]
    assert [im.tobytes() for _, im in a] == [im.tobytes() for _, im in b]


def test_other_seed_changes_items():
    a = [it.to_json() for it, _ in generate(_cfg(num_train=20, num_val=0, num_test=0, seed=0))]
    b = [it.to_json() for it, _ in generate(_cfg(num_train=20, num_val=0, num_test=0, seed=1))]
    assert sum(x != y for x, y in zip(a, b)) >= 15


def test_split_sizes_do_not_shift_other_items():
    small = {it.id: it.to_json() for it, _ in generate(_cfg(num_train=10, num_val=2, num_test=3))}
    big = {it.id: it.to_json() for it, _ in generate(_cfg(num_train=25, num_val=9, num_test=3))}
    assert all(big[k] == v for k, v in small.items())


def test_split_counts_ids_and_item_shape(items):
    splits = Counter(it.split for it, _ in items)
    assert splits == {"train": 120, "val": 20, "test": 30}
    assert items[0][0].id == "syn-train-000000"
    assert items[120][0].id == "syn-val-000000"
    assert items[-1][0].id == "syn-test-000029"
    assert len({it.id for it, _ in items}) == len(items)
    for it, im in items:
        assert it.images == []
        assert it.question.startswith(IMAGE_TAG) and it.question.count(IMAGE_TAG) == 1
        assert im.mode == "RGB" and im.size == (112, 112)
        assert set(it.scene) == {"width", "height", "background", "objects"}
        for o in it.scene["objects"]:
            assert set(o) == {"shape", "color", "size", "x", "y"}


def test_task_mix_weights_are_respected():
    cfg = _cfg(num_train=400, num_val=0, num_test=0,
               task_mix={"count": 3.0, "color": 1.0, "shape": 0.0, "exists": 0.0, "caption": 0.0})
    tasks = Counter(it.task for it, _ in generate(cfg))
    assert set(tasks) == {"count", "color"}
    # 400 draws with p=3/4: mean 300, sd 8.7; this fixed seed lands well inside 5 sd.
    assert 257 <= tasks["count"] <= 343


def _parse_count_question(text: str) -> tuple[str | None, str | None]:
    m = re.fullmatch(r"How many (?:(\w+) )?(\w+) are there\? Answer with a number\.", text)
    assert m, text
    color, noun = m.group(1), m.group(2)
    if noun == "shapes":
        return color, None
    return color, SINGULAR[noun]


def test_every_answer_agrees_with_the_scene(items):
    for it, _ in items:
        scene, text = it.scene, it.text
        if it.task == "count":
            color, shape = _parse_count_question(text)
            assert it.solution == str(count_objects(scene, color, shape)), it.to_json()
        elif it.task == "color":
            shape = re.fullmatch(r"What color is the (\w+)\? Answer with one word\.", text).group(1)
            matches = [o for o in scene["objects"] if o["shape"] == shape]
            assert len(matches) == 1 and matches[0]["color"] == it.solution, it.to_json()
        elif it.task == "shape":
            color = re.fullmatch(r"What shape is the (\w+) object\? Answer with one word\.", text).group(1)
            matches = [o for o in scene["objects"] if o["color"] == color]
            assert len(matches) == 1 and matches[0]["shape"] == it.solution, it.to_json()
        elif it.task == "exists":
            color, shape = re.fullmatch(r"Is there a (\w+) (\w+)\? Answer with one word\.", text).groups()
            assert it.solution == ("yes" if count_objects(scene, color, shape) else "no"), it.to_json()
        else:
            assert it.task == "caption" and it.solution == ""
            assert 1 <= len(it.references) <= 3
            truth = Counter((o["color"], o["shape"]) for o in scene["objects"])
            for ref in it.references:
                stated = Counter()
                for num, color, noun in re.findall(r"(?=\b(\w+) (\w+) (\w+)\b)", ref):
                    if color in COLORS and (noun in PLURALS or noun in SINGULAR):
                        n = 1 if num == "a" else int(WORD_TO_DIGIT[num])
                        stated[(color, SINGULAR.get(noun, noun))] += n
                assert stated == truth, (ref, scene)


def test_answers_are_balanced(items):
    big = list(generate(_cfg(num_train=600, num_val=0, num_test=0)))
    exists = Counter(it.solution for it, _ in big if it.task == "exists")
    assert abs(exists["yes"] - exists["no"]) <= 0.25 * sum(exists.values())
    counts = Counter(it.solution for it, _ in big if it.task == "count")
    assert set(counts) == {"0", "1", "2", "3"}
    assert max(counts.values()) <= 0.4 * sum(counts.values())   # no answer dominates


def test_render_draws_each_object_in_its_colour(items):
    for it, im in items:
        arr = np.asarray(im)
        for o in it.scene["objects"]:
            assert tuple(arr[o["y"], o["x"]]) == COLORS[o["color"]], it.id
        assert tuple(arr[0, 0]) in {(128, 128, 128)} | set(COLORS.values())


@pytest.mark.parametrize("shape,area", [("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5),
                                        ("diamond", 0.5), ("cross", 5 / 9)])
def test_shapes_have_their_own_area(shape, area):
    scene = {"width": 100, "height": 100, "background": "black",
             "objects": [{"shape": shape, "color": "red", "size": 60, "x": 50, "y": 50}]}
    arr = np.asarray(render(scene))
    filled = int((arr == COLORS["red"]).all(-1).sum())
    assert abs(filled / 3600 - area) < 0.06, (shape, filled / 3600)


def test_difficulty_parameters_are_honoured():
    syn = tuned_synthetic(canvas_size=64, min_objects=4, max_objects=5, min_object_size=8,
                          max_object_size=12, shapes=("diamond", "cross"), colors=("purple", "cyan"),
                          background="black")
    cfg = _cfg(num_train=60, num_val=0, num_test=0, synthetic=syn)
    for it, im in generate(cfg):
        assert im.size == (64, 64) and it.scene["width"] == it.scene["height"] == 64
        objs = it.scene["objects"]
        assert 4 <= len(objs) <= 5
        for o in objs:
            assert 8 <= o["size"] <= 12
            assert o["shape"] in ("diamond", "cross") and o["color"] in ("purple", "cyan")
            assert o["size"] / 2 <= o["x"] <= 64 - o["size"] / 2 and o["size"] / 2 <= o["y"] <= 64 - o["size"] / 2
        for a, b in itertools.combinations(objs, 2):
            assert np.hypot(a["x"] - b["x"], a["y"] - b["y"]) >= MIN_SEPARATION * (a["size"] + b["size"]) / 2
        colours = {tuple(c) for c in np.asarray(im).reshape(-1, 3)}
        assert (0, 0, 0) in colours and colours <= {(0, 0, 0), COLORS["purple"], COLORS["cyan"]}


def test_crowded_config_fails_with_a_clear_error():
    syn = tuned_synthetic(canvas_size=32, min_objects=6, max_objects=6, min_object_size=20,
                          max_object_size=24)
    with pytest.raises(SceneError, match="max_objects"):
        make_item(_cfg(num_train=1, synthetic=syn), "train", 0)
