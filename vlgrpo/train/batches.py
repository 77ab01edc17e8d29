"""Containers for one step's data: the prompts (with their image rows), micro-batches, the update batch.

A completion index n of a step belongs to prompt n // G; every container keeps that layout, and the image
rows (``pixel_values``) of a prompt always travel together, cut by ``image_grid_thw`` (never by a row count);
so do its video rows (``pixel_values_videos``, cut by ``video_grid_thw``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch


def _counts_spans(counts: Sequence[int]) -> list[tuple[int, int]]:
    ends = np.cumsum([0] + list(counts))
    return [(int(ends[i]), int(ends[i + 1])) for i in range(len(counts))]


def _rows_spans(grid: torch.Tensor | None, counts: Sequence[int]) -> list[tuple[int, int]]:
    """For each prompt, its rows [start, end) of the pixel tensor: Σ t·h·w over its images (videos)."""
    if grid is None:
        return [(0, 0)] * len(counts)
    rows = grid.prod(dim=-1).tolist()
    return _counts_spans([sum(rows[a:b]) for a, b in _counts_spans(counts)])


@dataclass
class PromptBatch:
    """P prompts, left-padded, with their images and videos; produced by ``prompt_encoding.encode_prompts``."""
    input_ids: torch.Tensor            # (P, L)
    attention_mask: torch.Tensor       # (P, L)
    mm_token_type_ids: torch.Tensor    # (P, L) 0 text, 1 image, 2 video
    pixel_values: torch.Tensor | None  # (R, D) patch rows of all images, prompt by prompt
    image_grid_thw: torch.Tensor | None  # (I, 3) one row per image
    images_per_prompt: list[int]
    pixel_values_videos: torch.Tensor | None = None   # (RV, D) patch rows of all videos, prompt by prompt
    video_grid_thw: torch.Tensor | None = None        # (V, 3) one row per video
    second_per_grid_ts: torch.Tensor | None = None    # (V,) seconds per temporal patch (M-RoPE time axis)
    videos_per_prompt: list[int] | None = None

    @classmethod
    def from_encoded(cls, enc: Any, images_per_prompt: Sequence[int],
                     videos_per_prompt: Sequence[int] | None = None) -> "PromptBatch":
        ids = enc["input_ids"]
        mm = enc.get("mm_token_type_ids")
        if mm is None:
            mm = torch.zeros_like(ids)
        return cls(ids, enc["attention_mask"], mm, enc.get("pixel_values"), enc.get("image_grid_thw"),
                   list(images_per_prompt), enc.get("pixel_values_videos"), enc.get("video_grid_thw"),
                   enc.get("second_per_grid_ts"), list(videos_per_prompt or [0] * ids.shape[0]))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def image_spans(self) -> list[tuple[int, int]]:
        """For each prompt, its rows [start, end) of ``image_grid_thw``."""
        return _counts_spans(self.images_per_prompt)

    def pixel_spans(self) -> list[tuple[int, int]]:
        """For each prompt, its rows [start, end) of ``pixel_values``: Σ t·h·w over its images.

        Splitting by ``image_grid_thw`` (never by a fixed row count) is what keeps one sample's patch rows
        together when a batch is cut into micro-batches.
        """
        return _rows_spans(self.image_grid_thw, self.images_per_prompt)

    def vision_kwargs(self) -> dict[str, torch.Tensor]:
        """The model's vision inputs (images and videos) that this batch has."""
        kw = {"pixel_values": self.pixel_values, "image_grid_thw": self.image_grid_thw,
              "pixel_values_videos": self.pixel_values_videos, "video_grid_thw": self.video_grid_thw,
              "second_per_grid_ts": self.second_per_grid_ts}
        return {k: v for k, v in kw.items() if v is not None}

    def select(self, idx: Sequence[int]) -> "PromptBatch":
        """Prompts ``idx`` (in that order, repeats allowed), with exactly their image and video rows; common
        left padding is trimmed so no compute is spent on columns that are padding in every row."""
        idx = list(idx)
        ids, mask, mm = self.input_ids[idx], self.attention_mask[idx], self.mm_token_type_ids[idx]
        first = int((mask.sum(0) > 0).nonzero()[0]) if mask.any() else 0
        ids, mask, mm = ids[:, first:], mask[:, first:], mm[:, first:]
        vpp = self.videos_per_prompt or [0] * len(self)

        def pick(t: torch.Tensor | None, spans: list[tuple[int, int]]) -> torch.Tensor | None:
            out = None if t is None else torch.cat([t[spans[i][0]:spans[i][1]] for i in idx])
            return out if out is not None and len(out) else None   # none of these prompts has one

        vspans = _counts_spans(vpp)
        return PromptBatch(ids, mask, mm, pick(self.pixel_values, self.pixel_spans()),
                           pick(self.image_grid_thw, self.image_spans()), [self.images_per_prompt[i] for i in idx],
                           pick(self.pixel_values_videos, _rows_spans(self.video_grid_thw, vpp)),
                           pick(self.video_grid_thw, vspans), pick(self.second_per_grid_ts, vspans),
                           [vpp[i] for i in idx])

    def to(self, device: torch.device) -> "PromptBatch":
        f = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return PromptBatch(f(self.input_ids), f(self.attention_mask), f(self.mm_token_type_ids),
                           f(self.pixel_values), f(self.image_grid_thw), list(self.images_per_prompt),
                           f(self.pixel_values_videos), f(self.video_grid_thw), f(self.second_per_grid_ts),
                           list(self.videos_per_prompt or []))


@dataclass
class MicroBatch:
    """Completions [start, end) of a step's batch: ``prompts`` holds each distinct prompt once and every
    prompt owns ``repeats`` consecutive completions (micro_batch_size is a multiple or a divisor of G)."""
    start: int
    end: int
    prompts: PromptBatch
    repeats: int


def micro_batches(prompts: PromptBatch, num_generations: int, micro_batch_size: int) -> list[MicroBatch]:
    """Cut N = P·G completions into micro-batches that never split a prompt's image rows."""
    n = len(prompts) * num_generations
    if micro_batch_size % num_generations and num_generations % micro_batch_size:
        raise ValueError(f"micro_batch_size {micro_batch_size} must be a multiple or a divisor of "
                         f"num_generations {num_generations}")
    out = []
    for s in range(0, n, micro_batch_size):
        e = min(s + micro_batch_size, n)
        first, last = s // num_generations, (e - 1) // num_generations
        out.append(MicroBatch(s, e, prompts.select(range(first, last + 1)), min(micro_batch_size,
                                                                                  num_generations)))
    return out


@dataclass
class StepBatch:
    """Everything one process needs for the update phase of one step.

    ``global_num_tokens``: completion tokens of the whole step over all processes (the normaliser of the
    token-level losses); None means this batch is the whole step. ``num_processes`` divides the per-process
    normalisers so that DDP's gradient mean gives the whole step's gradient.
    """
    prompts: PromptBatch
    completion_ids: torch.Tensor     # (N, C)
    completion_mask: torch.Tensor    # (N, C)
    advantages: torch.Tensor         # (N,)
    old_logp: torch.Tensor | None    # (N, C)
    ref_logp: torch.Tensor | None    # (N, C)
    global_num_tokens: float | None = None
    num_processes: int = 1
    # (N, C) weight of each token's policy term correcting the sampler/trainer mismatch (a rollout engine's
    # truncated importance sampling); None: every token weighs 1
    is_weight: torch.Tensor | None = None
