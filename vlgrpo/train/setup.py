"""Set-up of a GRPO run: paths, accelerator, policy (and reference), optimizer + schedule, train prompts,
rewards, the rollout strategy and the resume point - everything the loop reads, in one ``Run``."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vlgrpo.algo import grpo
from vlgrpo.config import Config, TrainConfig
from vlgrpo.data.manifest import read_manifest
from vlgrpo.model.precision import resolve_precision
from vlgrpo.rewards import RewardContext, extra_columns, setup_rewards
from vlgrpo.train import checkpoint as ckpt
from vlgrpo.train import sharding
from vlgrpo.train.data_order import load_train_items
from vlgrpo.train.dynamic import informative_rollout
from vlgrpo.train.errors import TrainingError
from vlgrpo.train.paths import RunPaths
from vlgrpo.train.rollout import rollout
from vlgrpo.train.sampling import SamplingSpec
from vlgrpo.train.scoring import CompletionScorer
from vlgrpo.train.state import RewardSetup, RolloutFn, Run

# train.mixed_precision -> the dtype autocast computes in (and the frozen reference is held in)
COMPUTE_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


def make_accelerator(mixed_precision: str):
    """An Accelerator for this run. accelerate keeps its state per process; a second run in the same process
    (pilot then train, or tests) may ask for another precision, so the precision part of that state is reset
    (the process group, if any, is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def build_optimizer(model: nn.Module, tc: TrainConfig):
    """AdamW at ``train.learning_rate`` and its schedule (linear warm-up over ``train.warmup_ratio`` of the
    updates, then cosine decay; one update = one optimizer step, ``num_iterations`` per GRPO step)."""
    # only what trains (with LoRA: the adapters) gets AdamW state. The fused kernel updates each tensor in
    # place; the default (foreach) one allocates temporaries the size of all weights (GBs at real width).
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay, fused=fused)
    total_updates = tc.max_steps * tc.num_iterations
    warmup = grpo.warmup_steps_for(total_updates, tc.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda u: grpo.lr_multiplier(u, total_updates, warmup))
    return optimizer, scheduler


COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


def load_models(cfg: Config, paths: RunPaths, device: torch.device):
    """The policy (train mode) and, when beta > 0, a frozen reference scorer → (model, processor, ref_scorer).

    ``train.lora``: the policy is the base (frozen, in the compute dtype) + trainable adapters, and the
    reference is the same module with the adapters switched off - no second copy."""
    from vlgrpo.model import loading, lora
    from vlgrpo.model.grad_checkpointing import enable_gradient_checkpointing

    tc = cfg.train
    if tc.lora.enabled:
        model, processor = lora.load_policy(paths.init_model_dir, tc.lora, COMPUTE_DTYPES[tc.mixed_precision])
    else:
        model, processor = loading.load_model(paths.init_model_dir, dtype=torch.float32)
    if tc.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if not tc.lora.quantize_4bit:                    # a 4-bit base is placed on its GPU when loaded
        model.to(device)
    if tc.lora.enabled:
        model.train()
        return model, processor, (lora.AdaptersOff(CompletionScorer(model)) if tc.beta > 0 else None)
    ref_scorer = None
    if cfg.train.beta > 0:                           # β = 0: no reference model at all
        # The frozen reference only runs forward passes under the policy's autocast, whose matmuls are in the
        # compute dtype anyway: holding it in that dtype (bf16/fp16) halves what a second fp32 copy costs.
        ref_model, _ = loading.load_model(paths.init_model_dir, dtype=COMPUTE_DTYPE[cfg.train.mixed_precision])
        ref_model.to(device).eval().requires_grad_(False)
        ref_scorer = CompletionScorer(ref_model)
    model.train()
    return model, processor, ref_scorer


def rollout_strategy(tc: TrainConfig) -> RolloutFn:
    """How every step of the run gets its batch, chosen once: with ``train.rollout.engine: vllm`` a vLLM
    engine samples (:func:`vlgrpo.train.engine.vllm_rollout`); with ``train.dynamic_sampling`` tied groups
    are resampled (:func:`vlgrpo.train.dynamic.informative_rollout`), else the step's prompts are sampled
    once (:func:`vlgrpo.train.rollout.rollout`)."""
    if tc.rollout.engine == "vllm":
        from vlgrpo.train.engine import vllm_rollout

        return vllm_rollout
    return informative_rollout if tc.dynamic_sampling else rollout


def start_rollout_engine(cfg: Config, paths: RunPaths, accelerator):
    """``train.rollout.engine: vllm``: the engine this run samples with (started, or connected to at
    ``train.rollout.vllm.url``), loading the run's starting model; None for ``hf``."""
    tc = cfg.train
    if tc.rollout.engine != "vllm":
        return None
    if accelerator.num_processes > 1:
        raise TrainingError("train.rollout.engine vllm runs in one trainer process for now; launch without "
                            "accelerate's multi-process mode or use engine: hf")
    from vlgrpo.train.engine import start_engine

    return start_engine(tc.rollout.vllm, paths.init_model_dir, paths.root, tc.seed)


def _restore(run: Run) -> None:
    """Resume from the newest good checkpoint of this run (another run's are deleted first); a resumed run
    drops the metric lines after the checkpoint's step."""
    acc = run.accelerator
    ckpt.drop_superseded(run.paths.out_dir, run.fingerprint, acc.is_main_process)
    acc.wait_for_everyone()
    path, state = ckpt.resume(run.paths.out_dir, run.policy, run.optimizer, run.scheduler,
                              reference=run.checkpointed_reference, sharded=run.sharded)
    if path is not None:
        run.start_step = run.resumed_from = int(state["step"])
        if acc.is_main_process:
            ckpt.truncate_metrics(run.paths.metrics_path, run.start_step)
    acc.wait_for_everyone()


def setup(cfg: Config, paths: RunPaths) -> Run:
    """Everything a run needs before its first step (``cfg.train`` is the run's train section) → a Run,
    resumed from its newest checkpoint when there is one. Raises TrainingError on a set-up that cannot train
    (fp16 on CPU, prompts_per_step not divisible by the processes, too few prompts)."""
    # "auto" becomes what this machine runs well; the run, its checkpoints and its metrics see the choice.
    tc = dataclasses.replace(cfg.train, mixed_precision=resolve_precision(cfg.train.mixed_precision,
                                                                          paths.init_model_dir))
    cfg = dataclasses.replace(cfg, train=tc)
    if tc.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise TrainingError("train.mixed_precision: fp16 needs a GPU (loss scaling); use bf16 or no on CPU")
    accelerator = make_accelerator(tc.mixed_precision)
    if tc.prompts_per_step % accelerator.num_processes:
        raise TrainingError(f"train.prompts_per_step ({tc.prompts_per_step}) must be divisible by the number "
                            f"of processes ({accelerator.num_processes})")
    # accelerate launch with an FSDP2 config: the trainer shards the policy itself (accelerate would not on CPU)
    sharded = sharding.fsdp2_requested() and accelerator.num_processes > 1
    unsupported = sharding.unsupported_with_sharding(tc) if sharded else []
    if unsupported:
        raise TrainingError("FSDP2 sharding (an accelerate config with fsdp_version: 2) does not support "
                            + "; ".join(unsupported))
    # rewards first: a reward whose parameters match no argument fails here, before any model is loaded
    weights = dict(cfg.rewards.weights)      # set up as evaluation does: the same functions, the same scores
    reward_ctx = RewardContext.from_config(cfg, paths.root, paths.manifest.parent,
                                           columns=extra_columns(read_manifest(paths.manifest, split="train")))
    rewards = RewardSetup(weights, setup_rewards(weights, reward_ctx))
    torch.manual_seed(tc.seed)
    model, processor, ref_scorer = load_models(cfg, paths, accelerator.device)
    if sharded:       # shard first: the optimizer must hold the sharded parameters
        scorer = sharding.shard(CompletionScorer(model), accelerator.device)
        optimizer, scheduler = build_optimizer(model, tc)
        if tc.lora.enabled and ref_scorer is not None:
            # the reference must run through the sharded root too: it gathers the embeddings and the head
            from vlgrpo.model import lora

            ref_scorer = lora.AdaptersOff(scorer)
    else:
        optimizer, scheduler = build_optimizer(model, tc)
        scorer, optimizer = accelerator.prepare(CompletionScorer(model), optimizer)
    sampling = SamplingSpec.for_training(tc, processor, model)
    items, dropped = load_train_items(cfg, processor, paths.manifest)
    run = Run(cfg, paths, accelerator, scorer, ref_scorer, optimizer, scheduler, processor, items, dropped,
              rewards, sampling, rollout_strategy(tc), sharded=sharded)
    run.fingerprint = ckpt.run_fingerprint(cfg, paths.init_model_dir, items)
    _restore(run)
    run.engine = start_rollout_engine(cfg, paths, accelerator)   # last: nothing after it can fail set-up
    return run
