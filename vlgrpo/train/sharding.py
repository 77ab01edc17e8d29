"""FSDP2 (torch ``fully_shard``) of the policy, applied by the trainer itself, on CPU (gloo) and GPU alike.

``accelerate launch --config_file configs/accelerate/fsdp2.yaml`` asks for FSDP2 through the environment it
gives each process (``ACCELERATE_USE_FSDP=true``, ``FSDP_VERSION=2``, ``FSDP_RESHARD_AFTER_FORWARD``). accelerate
1.15 itself turns FSDP on only for GPU process groups (``AcceleratorState`` upgrades MULTI_GPU-like types to
FSDP, never MULTI_CPU), so on a CPU machine its ``prepare`` would silently fall back to DDP; torch's
``fully_shard`` has no such limit. The trainer therefore shards the policy here whenever the launch asks for
FSDP2 and there are 2+ processes, and keeps it out of ``accelerator.prepare`` - one code path, tested on CPU
(tests/slow/test_sharded.py), the same on GPUs.

What is sharded: every decoder layer and vision block (the model's ``_no_split_modules``) is its own unit; the
rest (embeddings, tied head, norms, vision patch embedding and merger) belongs to the root unit, the
``CompletionScorer`` - whose ``forward`` runs the head too, so the tied head weight is gathered whenever it is
used. Parameters, gradients and AdamW state live as 1/N shards (``DTensor``) on each process; a unit's weights
are all-gathered for its forward / backward and freed after (``FSDP_RESHARD_AFTER_FORWARD``). Gradients are
reduce-scattered after every micro-batch's backward (no ``no_sync``: accumulating unsharded gradients would hold
a full gradient copy, what sharding is there to avoid). Generation runs through ``CompletionScorer.generate``,
registered as an FSDP forward method, so the root's weights are gathered for it too, and every process keeps
decoding until all are done (each forward is a collective).

Checkpoints have the unsharded format: the weights and the AdamW state are gathered tensor by tensor
(``full_tensor``) and written by the main process, so ``model.safetensors`` loads with the normal loaders and a
sharded run's checkpoint resumes a sharded or an unsharded run alike; on resume each process cuts its own
shards out of the full tensors (no communication).

LoRA (``train.lora``) on a sharded base: the frozen base (in the compute dtype) and the fp32 adapters are
sharded together, unit by unit (FSDP2 all-gathers a unit of mixed dtypes as bytes); only the adapters have
gradients to reduce-scatter and AdamW state. The reference policy is the same sharded root run with the
adapters switched off (``lora.AdaptersOff``), so its forward gathers the base like the policy's. Checkpoints
and the final model hold the adapters only, gathered: ``adapter.safetensors`` and the adapter directory of a
1-process LoRA run.

Not combined with sharding (set-up refuses them, naming the key): ``train.lora.quantize_4bit`` (a 4-bit
bitsandbytes base is not a tensor FSDP2 can cut), ``train.eval_steps`` / ``keep_best_checkpoint`` (evaluation
runs on the main process only, a sharded forward needs all), ``train.sync_ref_model``. Without LoRA the frozen
reference (beta > 0) is not sharded: each process holds it in the compute dtype.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import torch
from torch import nn


def fsdp2_requested() -> bool:
    """Does this process's launch ask for FSDP2 (accelerate's environment for ``distributed_type: FSDP``,
    ``fsdp_version: 2``)?"""
    return (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and os.environ.get("FSDP_VERSION", "1") == "2")


def unsupported_with_sharding(tc) -> list[str]:
    """The ``train`` settings of ``tc`` that sharded training does not support (empty when none)."""
    bad = []
    if tc.lora.enabled and tc.lora.quantize_4bit:
        bad.append("train.lora.quantize_4bit (QLoRA: use DDP, configs/accelerate/multi_gpu.yaml, or a bf16 base)")
    if tc.eval_steps is not None or tc.keep_best_checkpoint:
        bad.append("train.eval_steps / train.keep_best_checkpoint (evaluate the registered model instead)")
    if tc.sync_ref_model:
        bad.append("train.sync_ref_model")
    return bad


def _unit_classes(model: nn.Module) -> set[str]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(getattr(inner, "_no_split_modules", None) or [])


def shard(scorer: nn.Module, device: torch.device) -> nn.Module:
    """``fully_shard`` every decoder layer / vision block of ``scorer.model``, then ``scorer`` as the root unit
    (in place; returns ``scorer``). Builds the optimizer after this: the parameters become new ``DTensor`` s."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    names = _unit_classes(scorer.model)
    units = [m for m in scorer.model.modules() if type(m).__name__ in names]
    if not units:
        raise ValueError(f"{type(scorer.model).__name__}: no _no_split_modules to shard by")
    for m in units:
        fully_shard(m, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(scorer, mesh=mesh, reshard_after_forward=reshard)
    register_fsdp_forward_method(scorer, "generate")
    return scorer


def is_fsdp(module: nn.Module) -> bool:
    """Is ``module`` a unit sharded by ``fully_shard``?"""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _tie_groups(module: nn.Module) -> list[list[str]]:
    """State-dict names grouped by the tensor they share (tied embedding and head: one group of two)."""
    groups: dict[int, list[str]] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return list(groups.values())


def full_state_dict(module: nn.Module, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The unsharded weights of ``module`` as CPU tensors (tied names share one tensor, as in the unsharded
    model) on the main process, None on the others. A collective: every process must call it."""
    sd = module.state_dict(keep_vars=True)
    out: dict[str, torch.Tensor] = {}
    for group in _tie_groups(module):
        t = sd[group[0]].detach()
        full = (t.full_tensor() if is_sharded(t) else t).cpu()        # all-gather, one tensor at a time
        if is_main:
            for name in group:
                out[name] = full
    return out if is_main else None


def full_adapter_state(module: nn.Module, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The unsharded adapters of the LoRA policy ``module`` as CPU tensors, by its ``state_dict`` names, on the
    main process (None on the others); the frozen base is not gathered. A collective."""
    from vlgrpo.model import lora

    adapters = {id(p) for p in lora.adapter_parameters(module).values()}
    out: dict[str, torch.Tensor] = {}
    for name, t in module.state_dict(keep_vars=True).items():      # the same order on every process
        if id(t) in adapters:
            full = (t.detach().full_tensor() if is_sharded(t) else t.detach()).cpu()
            if is_main:
                out[name] = full
    return out if is_main else None


def gather_weights(module: nn.Module, is_main: bool) -> dict[str, torch.Tensor] | None:
    """What a sharded policy's checkpoint and final model hold, gathered: its adapters when it is a LoRA
    model (:func:`full_adapter_state`), else every weight (:func:`full_state_dict`). A collective."""
    from vlgrpo.model import lora

    if lora.peft_model(module) is not None:
        return full_adapter_state(module, is_main)
    return full_state_dict(module, is_main)


def unique_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` with one name per shared tensor - the sorted-first one, the name safetensors' ``save_model``
    keeps - so ``save_file`` accepts it and ``load_model`` reads it back into a tied model."""
    seen: dict[int, str] = {}
    for name in sorted(sd):
        seen.setdefault(id(sd[name]), name)
    return {name: sd[name].contiguous() for name in seen.values()}


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of ``full``, laid out as the sharded ``like`` (cut locally, no communication)."""
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


@torch.no_grad()
def _copy_full(t: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """Copy the unsharded ``src`` into ``t`` (this process's shard of it when ``t`` is sharded)."""
    if tuple(src.shape) != tuple(t.shape):
        raise ValueError(f"weight {name}: shape {tuple(src.shape)}, the model has {tuple(t.shape)}")
    if is_sharded(t):
        t.to_local().copy_(_shard_like(src, t).to_local())
    else:
        t.copy_(src)


def load_full_state_dict(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy unsharded ``weights`` (a name of each tied group is enough) into ``module``'s shards. Raises
    KeyError naming a weight the file lacks."""
    sd = module.state_dict(keep_vars=True)
    for group in _tie_groups(module):
        name = next((n for n in group if n in weights), None)
        if name is None:
            raise KeyError(f"missing weight {group[0]}")
        _copy_full(sd[group[0]], weights[name], name)


def load_adapter_state(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy unsharded adapter weights (by ``lora.trainable_state``'s names, as in ``adapter.safetensors``) into
    the LoRA policy ``module``'s shards. Raises LoraError naming missing or extra adapters."""
    from vlgrpo.model import lora

    params = lora.adapter_parameters(module)
    lora.check_adapter_names(set(params), set(weights))
    for name, p in params.items():
        _copy_full(p, weights[name], name)


def full_optimizer_state(optimizer, is_main: bool) -> dict[str, Any] | None:
    """``optimizer.state_dict()`` with every sharded state tensor gathered: the format of an unsharded run's
    (parameter order is the model's in both). Main process only (None elsewhere); a collective."""
    sd = optimizer.state_dict()
    state = {}
    for idx in sorted(sd["state"]):
        # every process takes part in each all-gather; only the main one keeps the result
        full = {k: (v.full_tensor() if is_sharded(v) else v).cpu() if torch.is_tensor(v) else v
                for k, v in sd["state"][idx].items()}
        if is_main:
            state[idx] = full
    return {"state": state, "param_groups": sd["param_groups"]} if is_main else None


def load_full_optimizer_state(optimizer, sd: dict[str, Any]) -> None:
    """Load an unsharded optimizer state into a sharded optimizer: each state tensor shaped like its parameter
    is cut into this process's shard of that parameter."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for idx, st in sd["state"].items():
        p = params[int(idx)]
        state[idx] = {k: (_shard_like(v, p) if is_sharded(p) and torch.is_tensor(v) and v.shape == p.shape
                          else v) for k, v in st.items()}
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """``clip_grad_norm_`` over sharded gradients: the norm of the whole gradient (every process gets it)."""
    total = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
    return float(total.full_tensor() if is_sharded(total) else total)


def all_processes(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on every process (one all-reduce)."""
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def max_over_processes(n: int, device: torch.device) -> int:
    """The largest ``n`` of all processes (one all-reduce)."""
    import torch.distributed as dist

    t = torch.tensor([n], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
