"""The state a GRPO run carries from module to module: the run itself (``Run``, set up once), and what each
step passes on - the sampled ``Completions``, the ``Rollout`` the update consumes, the ``UpdateResult`` the
metrics row reads, and the ``StepClock`` timing its phases.

Only types live here; the code that builds and advances them is in setup, rollout, dynamic, update and
metrics, which all import this module (it imports none of them).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from vlgrpo.config import Config, TrainConfig
from vlgrpo.train.backbone import unwrap
from vlgrpo.train.batches import StepBatch
from vlgrpo.train.paths import RunPaths
from vlgrpo.train.sampling import SamplingSpec


@dataclass
class RewardSetup:
    """The reward functions of ``rewards.weights``, resolved once per run, in the weights' order."""
    weights: dict[str, float]
    fns: dict[str, Callable]

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    def weight_tensor(self) -> torch.Tensor:
        return torch.tensor([self.weights[n] for n in self.names], dtype=torch.float32)


@dataclass(eq=False)          # tensors: == would compare element-wise, not say whether two are equal
class Completions:
    """G sampled completions per prompt, N = P·G rows in prompt order (prompt p owns rows p·G .. p·G + G - 1).

    ``ids`` (N, C) right-padded with the pad id; ``mask`` (N, C) covers each completion up to and including
    its stop token; ``terminated`` (N,) is False for a completion cut at the length limit.
    """
    ids: torch.Tensor
    mask: torch.Tensor
    terminated: torch.Tensor

    def to(self, device: torch.device | str) -> "Completions":
        return Completions(self.ids.to(device), self.mask.to(device), self.terminated.to(device))


@dataclass
class Rollout:
    """What one step's rollout gives: the local update batch, the local ``terminated`` flags and completion
    lengths, the rewards of all processes' completions (per reward (N_global, K), weighted total
    (N_global,), per-group std (P_global,)), and extra metrics (dynamic sampling's)."""
    batch: StepBatch
    terminated: torch.Tensor
    rewards: torch.Tensor
    total: torch.Tensor
    group_std: torch.Tensor
    lengths: torch.Tensor | None = None      # (N_local,) tokens; the batch's mask may have dropped some
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class UpdateResult:
    """What one step's update gives: this process's metric sums, added over the ``train.num_iterations``
    optimizer updates (``loss`` and ``<name>#sum`` / ``<name>#count`` pairs for entropy, kl and the clip
    ratios), and the grad norm of each update, in order."""
    sums: dict[str, float]
    grad_norms: list[float]

    @property
    def grad_norm(self) -> float:
        """The grad norm of the step's last optimizer update."""
        return self.grad_norms[-1]


class StepClock:
    """Where a step's time goes: ``lap(phase)`` records the seconds since the previous lap (this process)."""

    def __init__(self) -> None:
        self.start = self._last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = now - self._last
        self._last = now

    @property
    def total(self) -> float:
        return self._last - self.start


@dataclass
class Run:
    """The state of one GRPO run: set up once by ``setup``, read (and the model / optimizer / scheduler
    advanced) by every step.

    ``rollout_fn(run, step, clock)`` is how each step gets its batch, chosen once at set-up from
    ``train.dynamic_sampling``: ``vlgrpo.train.rollout.rollout`` (the step's prompts, sampled once) or
    ``vlgrpo.train.dynamic.informative_rollout`` (tied groups resampled).
    """
    cfg: Config
    paths: RunPaths
    accelerator: Any
    scorer: nn.Module                 # the policy, wrapped (DDP / autocast) by accelerate
    ref_scorer: nn.Module | None      # the frozen reference; None when beta is 0
    optimizer: Any
    scheduler: Any
    processor: Any
    items: list[Any]                  # train prompts that fit train.max_prompt_tokens
    dropped: int                      # over-long prompts left out
    rewards: RewardSetup
    sampling: SamplingSpec
    rollout_fn: RolloutFn
    fingerprint: str = ""
    start_step: int = 0
    resumed_from: int | None = None
    sharded: bool = False             # FSDP2 applied by the trainer (vlgrpo.train.sharding)
    eval_rewards: dict[str, Any] | None = None   # reward functions of in-training evaluation, built on first use
    engine: Any = None                # train.rollout.engine vllm: the engine client (vlgrpo.train.engine)

    @property
    def tc(self) -> TrainConfig:
        return self.cfg.train

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def local_prompts(self) -> int:
        return self.tc.prompts_per_step // self.world

    @property
    def policy(self) -> nn.Module:
        """The bare policy model (unwrapped)."""
        return unwrap(self.scorer).model

    @property
    def reference(self) -> nn.Module | None:
        """The bare reference model; None when beta is 0."""
        return unwrap(self.ref_scorer).model if self.ref_scorer is not None else None

    @property
    def checkpointed_reference(self) -> nn.Module | None:
        """The reference model when it changes during the run (``train.sync_ref_model``): checkpoints must
        then hold it for an exact resume. None otherwise (it is the base model, reloaded at set-up)."""
        return self.reference if self.tc.sync_ref_model else None


# One step's rollout on this process: (run, 0-based step, clock) -> the batch the update consumes
RolloutFn = Callable[[Run, int, StepClock], Rollout]
