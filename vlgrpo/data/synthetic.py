"""Deterministic CLEVR-like scene generator: coloured shapes on a plain canvas, with VQA items whose answers
are checked against the scene graph.

    from vlgrpo.config import DataConfig
    from vlgrpo.data.synthetic import generate
    for item, image in generate(DataConfig(num_train=8, num_val=2, num_test=2)):
        ...  # item.images == []: the caller caches `image` and fills the path
             # (a ``motion`` item is a video: `image` is its list of frames, for item.videos)

Determinism: item ``i`` of split ``s`` draws everything (task, scene, question) from its own generator
seeded with ``(cfg.seed, s, i)``, so the same config gives byte-identical images and items, and changing
``num_val`` does not change a single train item.

Difficulty knobs (``data.synthetic`` in params.yaml): canvas size, object count range, object size range
(pixels of the bounding box side), and which shapes / colours occur. Measured while tuning the default: a tiny
Qwen2.5-VL learns the colour of 40-70 px shapes on a 112 px canvas, not of 12-30 px shapes.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageColor, ImageDraw

from vlgrpo.config import SYNTHETIC_COLORS, SYNTHETIC_SHAPES
from vlgrpo.data.answers import number_word

SHAPES = SYNTHETIC_SHAPES
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
          "purple": (150, 60, 200), "orange": (240, 140, 30), "cyan": (40, 200, 210), "white": (245, 245, 245)}
if tuple(COLORS) != SYNTHETIC_COLORS:  # the config validates against the names; the RGB table must match
    raise ImportError("vlgrpo.data.synthetic.COLORS must name exactly vlgrpo.config.SYNTHETIC_COLORS")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses"}
BACKGROUNDS = {"gray": (128, 128, 128), "grey": (128, 128, 128), "black": (0, 0, 0),
               "white": (255, 255, 255), "dark": (40, 40, 40)}

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
VERIFIABLE_TASKS = ("count", "color", "shape", "exists")
# fixed order (new tasks go last): the same weights map to the same draws, so existing items never change
TASK_ORDER = ("count", "color", "shape", "exists", "caption", "ground", "motion")
DIRECTIONS = ("left", "right", "up", "down")
MOTION_FRAMES = 4

ONE_WORD = " Answer with one word."
NUMBER = " Answer with a number."
CAPTION_PROMPT = "Describe the shapes in the image."
BOX_PROMPT = " Answer with its bounding box [x1, y1, x2, y2] in pixels."

# Two objects' centres must be at least this fraction of their mean size apart: 0.9 lets bounding boxes
# touch at the corners but keeps every shape clearly visible.
MIN_SEPARATION = 0.9
_PLACE_TRIES = 200      # placements tried per object before the scene is restarted
_SCENE_TRIES = 200      # scenes tried per item before giving up (a config that is too crowded)


class SceneError(ValueError):
    """The synthetic config cannot produce the requested scenes (e.g. too many large objects)."""


# ------------------------------------------------------------------------------------------ scene graph


def item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator that owns item ``index`` of ``split``: independent of every other item."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_CODES[split], int(index)]))


def sample_scene(rng: np.random.Generator, syn: Any) -> dict[str, Any]:
    """Rejection-sample a scene graph from a ``SyntheticConfig`` (objects inside the canvas, little overlap)."""
    size = syn.canvas_size
    for _ in range(_SCENE_TRIES):
        n = int(rng.integers(syn.min_objects, syn.max_objects + 1))
        objects: list[dict[str, Any]] = []
        for _ in range(n):
            obj = _place(rng, syn, objects)
            if obj is None:
                break
            objects.append(obj)
        if len(objects) == n:
            return {"width": size, "height": size, "background": syn.background, "objects": objects}
    raise SceneError(f"data.synthetic: could not place {syn.max_objects} objects of up to "
                     f"{syn.max_object_size}px on a {size}px canvas without overlap; lower "
                     f"max_objects / max_object_size or raise canvas_size")


def _place(rng: np.random.Generator, syn: Any, placed: list[dict[str, Any]]) -> dict[str, Any] | None:
    s = int(rng.integers(syn.min_object_size, syn.max_object_size + 1))
    shape = syn.shapes[int(rng.integers(len(syn.shapes)))]
    color = syn.colors[int(rng.integers(len(syn.colors)))]
    half = s / 2
    lo, hi = int(np.ceil(half)), int(syn.canvas_size - np.ceil(half))
    for _ in range(_PLACE_TRIES):
        x, y = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        if all(np.hypot(x - o["x"], y - o["y"]) >= MIN_SEPARATION * (s + o["size"]) / 2 for o in placed):
            return {"shape": shape, "color": color, "size": s, "x": x, "y": y}
    return None


def count_objects(scene: dict[str, Any], color: str | None = None, shape: str | None = None) -> int:
    """Objects matching the colour and/or shape (None = any)."""
    return sum(1 for o in scene["objects"]
               if (color is None or o["color"] == color) and (shape is None or o["shape"] == shape))


# ------------------------------------------------------------------------------------------- rendering


def _rgb(name: str) -> tuple[int, int, int]:
    if name in BACKGROUNDS:
        return BACKGROUNDS[name]
    if name in COLORS:
        return COLORS[name]
    try:
        return ImageColor.getrgb(name)[:3]
    except ValueError:
        raise SceneError(f"data.synthetic.background: unknown colour {name!r}; use one of "
                         f"{', '.join(BACKGROUNDS)} or a '#rrggbb' value") from None


def _draw_object(draw: ImageDraw.ImageDraw, o: dict[str, Any]) -> None:
    x, y, h = o["x"], o["y"], o["size"] / 2
    fill = COLORS[o["color"]]
    box = (x - h, y - h, x + h, y + h)
    if o["shape"] == "circle":
        draw.ellipse(box, fill=fill)
    elif o["shape"] == "square":
        draw.rectangle(box, fill=fill)
    elif o["shape"] == "triangle":
        draw.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=fill)
    elif o["shape"] == "diamond":
        draw.polygon([(x, y - h), (x + h, y), (x, y + h), (x - h, y)], fill=fill)
    elif o["shape"] == "cross":
        t = o["size"] / 6  # half the bar thickness: bars are a third of the size wide
        draw.rectangle((x - h, y - t, x + h, y + t), fill=fill)
        draw.rectangle((x - t, y - h, x + t, y + h), fill=fill)
    else:
        raise SceneError(f"unknown shape {o['shape']!r}; known: {', '.join(SHAPES)}")


def render(scene: dict[str, Any]) -> Image.Image:
    """Draw the scene graph as an RGB image (objects in list order; later ones on top)."""
    img = Image.new("RGB", (scene["width"], scene["height"]), _rgb(scene.get("background", "gray")))
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        _draw_object(draw, o)
    return img


# ------------------------------------------------------------------------------------------- questions


def _pick(rng: np.random.Generator, seq: Any) -> Any:
    seq = list(seq)
    return seq[int(rng.integers(len(seq)))]


def _noun(shape: str, n: int) -> str:
    return shape if n == 1 else PLURALS[shape]


def plan_count(rng: np.random.Generator, syn: Any) -> dict[str, Any]:
    """Draw the count question *before* the scene, so answers are balanced rather than mostly 1.

    ``all`` asks for the total (target uniform in [min_objects, max_objects]); the others ask for a colour,
    a shape or both, with a target uniform in [0, max_objects].
    """
    kind = _pick(rng, ("all", "color", "shape", "color_shape"))
    if kind == "all":
        target = int(rng.integers(syn.min_objects, syn.max_objects + 1))
    else:
        target = int(rng.integers(0, syn.max_objects + 1))
    return {"kind": kind, "target": target, "color": _pick(rng, syn.colors), "shape": _pick(rng, syn.shapes)}


def _other(rng: np.random.Generator, values: Any, avoid: str) -> str:
    return _pick(rng, [v for v in values if v != avoid])


def make_count(rng: np.random.Generator, scene: dict[str, Any], syn: Any,
               plan: dict[str, Any]) -> tuple[str, str, dict] | None:
    """How many (colour) (shape)s: recolour/reshape objects so that exactly ``plan['target']`` match.

    Only attributes change (positions stay), so the scene keeps its no-overlap layout. None when the scene
    has too few objects for the target (or, for ``all``, a different number of objects).
    """
    kind, t, color, shape = plan["kind"], plan["target"], plan["color"], plan["shape"]
    objs = scene["objects"]
    if kind == "all":
        if len(objs) != t:
            return None
        return "How many shapes are there?" + NUMBER, str(t), {"qtype": "count_all"}
    if len(objs) < t:
        return None
    chosen = set(int(i) for i in rng.permutation(len(objs))[:t])
    for i, o in enumerate(objs):
        want = i in chosen
        if kind in ("color", "color_shape") and want:
            o["color"] = color
        if kind in ("shape", "color_shape") and want:
            o["shape"] = shape
        if not want and kind == "color" and o["color"] == color:
            o["color"] = _other(rng, syn.colors, color)
        if not want and kind == "shape" and o["shape"] == shape:
            o["shape"] = _other(rng, syn.shapes, shape)
        if not want and kind == "color_shape" and (o["color"], o["shape"]) == (color, shape):
            o["color"] = _other(rng, syn.colors, color)
    if kind == "color":
        q = f"How many {color} shapes are there?"
    elif kind == "shape":
        q = f"How many {PLURALS[shape]} are there?"
    else:
        q = f"How many {color} {PLURALS[shape]} are there?"
    n = count_objects(scene, color if kind != "shape" else None, shape if kind != "color" else None)
    assert n == t, (plan, scene)  # the construction above guarantees it; a failure is a bug here
    return q + NUMBER, str(n), {"qtype": f"count_{kind}"}


def make_color(rng: np.random.Generator, scene: dict[str, Any], syn: Any) -> tuple[str, str, dict] | None:
    """Colour of the shape that occurs once; None when every shape in the scene repeats."""
    counts = Counter(o["shape"] for o in scene["objects"])
    unique = [s for s in syn.shapes if counts[s] == 1]
    if not unique:
        return None
    shape = _pick(rng, unique)
    color = next(o["color"] for o in scene["objects"] if o["shape"] == shape)
    return f"What color is the {shape}?" + ONE_WORD, color, {"qtype": "color"}


def make_shape(rng: np.random.Generator, scene: dict[str, Any], syn: Any) -> tuple[str, str, dict] | None:
    """Shape of the object whose colour occurs once; None when every colour repeats."""
    counts = Counter(o["color"] for o in scene["objects"])
    unique = [c for c in syn.colors if counts[c] == 1]
    if not unique:
        return None
    color = _pick(rng, unique)
    shape = next(o["shape"] for o in scene["objects"] if o["color"] == color)
    return f"What shape is the {color} object?" + ONE_WORD, shape, {"qtype": "shape"}


def make_exists(rng: np.random.Generator, scene: dict[str, Any], syn: Any) -> tuple[str, str, dict] | None:
    """Is there a <colour> <shape>? The answer is drawn first (yes/no with p=1/2), so the task is balanced."""
    present = {(o["color"], o["shape"]) for o in scene["objects"]}
    if rng.random() < 0.5:
        color, shape = _pick(rng, sorted(present))
        answer = "yes"
    else:
        absent = [(c, s) for c in syn.colors for s in syn.shapes if (c, s) not in present]
        if not absent:
            return None
        color, shape = _pick(rng, absent)
        answer = "no"
    return f"Is there a {color} {shape}?" + ONE_WORD, answer, {"qtype": "exists"}


def groups(scene: dict[str, Any]) -> list[tuple[int, str, str]]:
    """``(count, colour, shape)`` per distinct colour+shape, in reading order of first appearance."""
    order = sorted(scene["objects"], key=lambda o: (o["y"] // 16, o["x"]))  # rows of 16 px, left to right
    counts = Counter((o["color"], o["shape"]) for o in order)
    seen: dict[tuple[str, str], None] = {}
    for o in order:
        seen.setdefault((o["color"], o["shape"]), None)
    return [(counts[k], k[0], k[1]) for k in seen]


def _phrase(gs: list[tuple[int, str, str]]) -> str:
    parts = [f"{'a' if n == 1 else number_word(n)} {c} {_noun(s, n)}" for n, c, s in gs]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(scene: dict[str, Any]) -> list[str]:
    """Three template captions stating exactly the scene's counts per colour+shape (no false facts)."""
    gs = groups(scene)
    total = len(scene["objects"])
    by_count = sorted(gs, key=lambda g: (-g[0], g[1], g[2]))
    noun = "shape" if total == 1 else "shapes"
    return [
        _phrase(gs),
        f"there {'is' if total == 1 else 'are'} {number_word(total)} {noun}: {_phrase(by_count)}",
        f"an image of {_phrase(list(reversed(gs)))}",
    ]


def make_caption(rng: np.random.Generator, scene: dict[str, Any], syn: Any) -> tuple[str, str, dict] | None:
    refs = captions(scene)
    k = int(rng.integers(1, len(refs) + 1))
    return CAPTION_PROMPT, "", {"qtype": "caption", "references": refs[:k]}


def object_box(o: dict[str, Any], width: int, height: int) -> list[int]:
    """[x1, y1, x2, y2] pixel box of a drawn object (its bounding square, kept inside the canvas)."""
    h = o["size"] / 2
    return [max(0, round(o["x"] - h)), max(0, round(o["y"] - h)),
            min(width, round(o["x"] + h)), min(height, round(o["y"] + h))]


def make_ground(rng: np.random.Generator, scene: dict[str, Any], syn: Any) -> tuple[str, str, dict] | None:
    """Where is the <colour> <shape>? The answer is its box, as JSON ``[x1, y1, x2, y2]`` in image pixels;
    asked only of a colour+shape that occurs once (None when every one repeats)."""
    counts = Counter((o["color"], o["shape"]) for o in scene["objects"])
    unique = [k for k in sorted(counts) if counts[k] == 1]
    if not unique:
        return None
    color, shape = _pick(rng, unique)
    o = next(o for o in scene["objects"] if (o["color"], o["shape"]) == (color, shape))
    box = object_box(o, scene["width"], scene["height"])
    return f"Where is the {color} {shape}?" + BOX_PROMPT, "[" + ", ".join(map(str, box)) + "]", {"qtype": "ground"}


def make_motion(rng: np.random.Generator, syn: Any) -> tuple[str, str, dict, list[Image.Image]]:
    """A video of ``MOTION_FRAMES`` frames: one shape crossing the canvas left / right / up / down; asked
    which way it moves. The answer is drawn first (balanced); the shape keeps a clear margin at both ends."""
    size, direction = syn.canvas_size, _pick(rng, DIRECTIONS)
    s = int(rng.integers(syn.min_object_size, min(syn.max_object_size, size // 3) + 1))
    obj = {"shape": _pick(rng, syn.shapes), "color": _pick(rng, syn.colors), "size": s}
    lo, hi = int(np.ceil(s / 2)), size - int(np.ceil(s / 2))
    across = [round(lo + (hi - lo) * k / (MOTION_FRAMES - 1)) for k in range(MOTION_FRAMES)]
    if direction in ("left", "up"):
        across.reverse()
    other = int(rng.integers(lo, hi + 1))
    path = [(a, other) if direction in ("left", "right") else (other, a) for a in across]
    scene = {"width": size, "height": size, "background": syn.background, "objects": [{**obj, "x": path[0][0],
             "y": path[0][1]}], "path": [list(p) for p in path]}
    frames = [render({**scene, "objects": [{**obj, "x": x, "y": y}]}) for x, y in path]
    q = f"Which way does the {obj['color']} {obj['shape']} move? Answer left, right, up or down."
    return q, direction, {"qtype": "motion", "scene": scene}, frames


MAKERS = {"count": make_count, "color": make_color, "shape": make_shape, "exists": make_exists,
          "caption": make_caption, "ground": make_ground}


# ------------------------------------------------------------------------------------------ generation


def _task_weights(task_mix: dict[str, float]) -> tuple[list[str], np.ndarray]:
    tasks = [t for t in TASK_ORDER if task_mix.get(t, 0) > 0]
    w = np.array([task_mix[t] for t in tasks], dtype=np.float64)
    return tasks, w / w.sum()


def make_item(cfg: Any, split: str, index: int) -> tuple[Any, Image.Image]:
    """Item ``index`` of ``split`` and its image (a list of frames for a video task), from that item's own
    generator."""
    from vlgrpo.data.manifest import IMAGE_TAG, VIDEO_TAG, Item

    rng = item_rng(cfg.seed, split, index)
    tasks, probs = _task_weights(cfg.task_mix)
    task = tasks[int(rng.choice(len(tasks), p=probs))]
    if task == "motion":
        question, solution, extra, frames = make_motion(rng, cfg.synthetic)
        scene = extra.pop("scene")
        return Item(id=f"syn-{split}-{index:06d}", split=split, task=task, question=VIDEO_TAG + question,
                    images=[], solution=solution, scene=scene, extra=extra), frames
    # Count questions are planned before the scene (balanced answers); the others adapt to the scene.
    extra_args = (plan_count(rng, cfg.synthetic),) if task == "count" else ()
    for _ in range(_SCENE_TRIES):
        scene = sample_scene(rng, cfg.synthetic)
        made = MAKERS[task](rng, scene, cfg.synthetic, *extra_args)
        if made is not None:  # a question that cannot be asked of this scene: draw another scene
            break
    else:
        raise SceneError(f"data.synthetic: no scene in {_SCENE_TRIES} tries supports a {task!r} question "
                         f"(item {split}/{index}); allow more shapes/colours or fewer objects")
    question, solution, extra = made
    references = extra.pop("references", [])
    item = Item(id=f"syn-{split}-{index:06d}", split=split, task=task, question=IMAGE_TAG + question,
                images=[], solution=solution, references=references, scene=scene, extra=extra)
    return item, render(scene)


def generate(cfg: Any) -> Iterator[tuple[Any, Image.Image]]:
    """Yield ``(Item, image)`` for ``num_train`` train, ``num_val`` val and ``num_test`` test items."""
    for split, n in (("train", cfg.num_train), ("val", cfg.num_val), ("test", cfg.num_test)):
        for i in range(n):
            yield make_item(cfg, split, i)
