"""How the rollout samples (``SamplingSpec``): fixed once per run at set-up, read by generation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from vlgrpo.config import TrainConfig


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample: G completions of at most ``max_new_tokens`` at ``temperature`` / ``top_p``, stopping
    at any of ``stop_ids``; finished rows are filled with ``pad_id``; ``banned_ids`` (the vision tokens,
    ``decoding.vision_token_ids``) are never sampled."""
    num_generations: int
    max_new_tokens: int
    temperature: float
    top_p: float
    stop_ids: tuple[int, ...]
    pad_id: int
    banned_ids: tuple[int, ...]

    @classmethod
    def for_training(cls, tc: TrainConfig, processor: Any, model: nn.Module) -> "SamplingSpec":
        """The rollout's sampling: ``train.num_generations``, ``max_completion_length``, ``temperature``,
        ``top_p``; stop, pad and banned ids from the processor and model (the ones evaluation uses)."""
        from vlgrpo.model import decoding

        return cls(tc.num_generations, tc.max_completion_length, tc.temperature, tc.top_p,
                   tuple(decoding.stop_token_ids(processor, model)), processor.tokenizer.pad_token_id,
                   tuple(decoding.vision_token_ids(processor, model)))
