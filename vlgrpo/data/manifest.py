"""The manifest: one JSON object a line, the contract between the data stage and everything after it.

Schema of one line (``Item.to_json``):

    {"id": "syn-000123", "split": "train"|"val"|"test", "task": "count"|"color"|"shape"|"exists"|"caption"|...,
     "question": "<image>How many red circles are there?",   # '<image>' marks where each image goes
     "images": ["cache/ab/ab12....png"],                     # relative to the manifest's folder
     "solution": "2",                                        # verifiable answer ('' for pure captions)
     "references": ["a red circle ..."],                     # reference captions (caption items)
     "scene": {"width":112,"height":112,"objects":[{"shape":..,"color":..,"size":..,"x":..,"y":..}]} | null,
     "system": null | "...",
     "extra": {...},                                         # any extra columns, passed to rewards
     "turns": [{"role": "user"|"assistant"|"tool", "content": "..."}, ...]}   # only for multi-turn prompts

``turns`` (absent when empty) holds every prompt turn of a multi-turn row in order, the last user turn
included; ``question`` is then that last user turn. ``<image>`` tags count across all turns, in order.

Only the first three keys plus ``images`` and ``question`` are required to build an ``Item``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from vlgrpo.io import atomic_path

IMAGE_TAG = "<image>"
SPLITS = ("train", "val", "test")


@dataclass
class Item:
    id: str
    split: str
    task: str
    question: str
    images: list[str]
    solution: str = ""
    references: list[str] = field(default_factory=list)
    scene: dict[str, Any] | None = None
    system: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    turns: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> str:
        d = asdict(self)
        if not d["turns"]:  # single-turn rows (the common case) keep the compact schema
            del d["turns"]
        return json.dumps(d, ensure_ascii=False, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Item":
        return cls(id=str(d["id"]), split=d["split"], task=d["task"], question=d["question"],
                   images=list(d["images"]), solution=d.get("solution", "") or "",
                   references=list(d.get("references") or []), scene=d.get("scene"),
                   system=d.get("system"), extra=dict(d.get("extra") or {}),
                   turns=[dict(t) for t in d.get("turns") or []])

    @property
    def prompt_turns(self) -> list[dict[str, str]]:
        """Every prompt turn in order (a single user turn when the row is not multi-turn)."""
        return self.turns or [{"role": "user", "content": self.question}]

    @property
    def text(self) -> str:
        """The question without image tags (what a person reads)."""
        return self.question.replace(IMAGE_TAG, "").strip()

    def columns(self) -> dict[str, Any]:
        """Per-item columns handed to reward functions as keyword arguments."""
        cols = {"id": self.id, "task": self.task, "solution": self.solution,
                "references": self.references, "scene": self.scene, "images": self.images}
        for k, v in self.extra.items():
            cols.setdefault(k, v)
        return cols


def write_manifest(path: str | Path, items: Iterable[Item]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for it in items:
            f.write(it.to_json() + "\n")
            n += 1
    return n


def iter_manifest(path: str | Path) -> Iterator[Item]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield Item.from_dict(json.loads(line))


def read_manifest(path: str | Path, split: str | None = None) -> list[Item]:
    return [it for it in iter_manifest(path) if split is None or it.split == split]


def resolve_image(manifest: str | Path, rel: str) -> Path:
    return Path(manifest).parent / rel
