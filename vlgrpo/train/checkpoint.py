"""Checkpoint I/O: ``out_dir/checkpoints/step-N`` (weights, optimizer, scheduler, RNG, trainer state), written
atomically, resumed exactly, and guarded by a fingerprint of what a step computes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from vlgrpo.config import Config
from vlgrpo.io import atomic_dir, atomic_write_text, write_content_hashes
from vlgrpo.train import sharding
from vlgrpo.train.errors import TrainingError

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter.safetensors"        # a LoRA run's checkpointed weights

# Keys that do not change what a step computes: a resume may differ in them.
# (evaluation during training decodes greedily - no random draws - and changes no weight; logprob_chunk
# changes only how many tokens are scored at once - memory - not the result beyond float rounding, so a run
# that ran out of memory can resume with a smaller one; gradient checkpointing recomputes the same
# operations: the same numbers, less memory; the watch only reads the metrics and may end a run early.)
_RESUME_NEUTRAL = ("save_steps", "out_dir", "eval_steps", "keep_best", "logprob_chunk", "watch",
                   "save_total_limit", "keep_best_checkpoint", "gradient_checkpointing")
# Where the rollout engine runs and how much memory or time it is given: a run moved to another engine
# process (a new URL, another interpreter, a longer timeout) samples the same maths and resumes.
_ENGINE_PLACEMENT = ("python", "url", "kv_cache_gib", "gpu_memory_utilization", "startup_timeout_s",
                     "request_timeout_s")
REFERENCE_FILE = "ref_model.safetensors"   # the reference weights, when train.sync_ref_model moves them


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete ``checkpoints/step-N`` dirs, newest first (complete = renamed into place, holding the state
    file; a killed writer's hidden ``.step-N.*.tmp`` dir never matches)."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
            and p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name[5:]), reverse=True)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete ``checkpoints/step-N``, or None."""
    done = complete_checkpoints(out_dir)
    return done[0] if done else None


def run_fingerprint(cfg: Config, init_model_dir: str | Path, items: Sequence[Any]) -> str:
    """What a checkpoint must share with this run to be resumed: the step-defining ``cfg.train`` settings,
    rewards, pixel budget, the starting weights and the prompt list (ids in order)."""
    h = hashlib.sha256()
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in _RESUME_NEUTRAL}
    engine = train.get("rollout", {}).get("vllm", {})
    for k in _ENGINE_PLACEMENT:
        engine.pop(k, None)
    h.update(json.dumps({"train": train, "rewards": dataclasses.asdict(cfg.rewards),
                         "pixels": [cfg.data.min_pixels, cfg.data.max_pixels]}, sort_keys=True,
                        default=str).encode())
    for f in sorted(Path(init_model_dir).glob("*.safetensors")):
        st = f.stat()  # size + mtime: checkpoints can be GBs, and a rewritten base gets a new mtime
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update("\n".join(it.id for it in items).encode())
    return h.hexdigest()


def checkpoint_fingerprint(path: Path) -> str | None:
    """The fingerprint stored in a checkpoint's state file; None when it cannot be read."""
    try:
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError):
        return None


def drop_superseded(out_dir: Path, fingerprint: str, is_main: bool) -> None:
    """Delete ``out_dir/checkpoints`` when a readable checkpoint in it names another run.

    Resuming it would silently return that run's policy (other train/reward settings, data or base model).
    A checkpoint whose state cannot be read is left to ``resume`` (it skips it). The previous final model
    stays in ``out_dir`` until this run's model replaces it. Only the main process deletes.
    """
    if any(checkpoint_fingerprint(p) not in (None, fingerprint) for p in complete_checkpoints(out_dir)):
        if is_main:
            print(f"{out_dir / CHECKPOINT_DIR}: checkpoints from a run with other settings, data or base "
                  f"model - starting a fresh run", file=sys.stderr)
            shutil.rmtree(out_dir / CHECKPOINT_DIR)


def _rng_state() -> dict[str, Any]:
    # numpy's state as plain Python values: the file must load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.random.get_rng_state(),
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


@dataclasses.dataclass
class Gathered:
    """A sharded policy's checkpoint content, gathered by every process (vlgrpo.train.sharding): unsharded
    weights and optimizer state, in the format of an unsharded run's."""
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, state: dict[str, Any],
                    reference: nn.Module | None = None, gathered: Gathered | None = None) -> None:
    """Weights (safetensors) + optimizer + scheduler + RNG + trainer state (+ the reference model's weights
    when given), written to a temp dir and renamed. A LoRA policy's weights are its adapters
    (``adapter.safetensors``): the base is frozen and named by the run's fingerprint. ``gathered``: a sharded
    policy's weights and optimizer state (written instead of ``model`` / ``optimizer``'s own)."""
    from safetensors.torch import save_file, save_model as st_save

    from vlgrpo.model import lora

    # A full disk names the folder and the space needed: about what the previous checkpoint took.
    with atomic_dir(path, like=latest_checkpoint(path.parent.parent)) as tmp:
        if lora.peft_model(model) is not None:
            weights = gathered.weights if gathered is not None else None
            save_file(lora.trainable_state(model, weights), str(tmp / ADAPTER_FILE))
        elif gathered is not None:
            save_file(sharding.unique_names(gathered.weights), str(tmp / "model.safetensors"))
        else:
            st_save(model, str(tmp / "model.safetensors"))
        if reference is not None:
            st_save(reference, str(tmp / REFERENCE_FILE))
        torch.save(gathered.optimizer if gathered is not None else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng_state.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def rotate_checkpoints(out_dir: Path, limit: int | None, keep_best: bool = False,
                       current: Path | None = None) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``limit`` (``train.save_total_limit``); with
    ``keep_best``, the one whose state records the highest ``reward`` stays too. Returns what was deleted.

    Only complete checkpoints are counted and deleted. ``current`` (the one just written) always stays, even
    when a higher-numbered leftover of another run sits beside it, so resume always has a good checkpoint.
    A killed writer's hidden temp dir is not touched (nothing reads it).
    """
    done = complete_checkpoints(out_dir)
    if limit is None or len(done) <= limit:
        return []
    keep = set(done[:limit]) | ({Path(current)} if current is not None else set())
    if keep_best:
        rewards = {p: _state_reward(p) for p in done}
        scored = [p for p in done if rewards[p] is not None]
        if scored:
            keep.add(max(scored, key=lambda p: (rewards[p], int(p.name[5:]))))
    gone = [p for p in done if p not in keep]
    for p in gone:
        shutil.rmtree(p)
    return gone


def _state_reward(path: Path) -> float | None:
    try:
        r = json.loads((path / STATE_FILE).read_text(encoding="utf-8")).get("reward")
    except (OSError, ValueError):
        return None
    return float(r) if isinstance(r, (int, float)) and r == r else None


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler,
                    reference: nn.Module | None = None, sharded: bool = False) -> dict[str, Any]:
    """Overwrite weights, optimizer, scheduler, RNG (and the reference model's weights when given) from
    ``path``; returns its trainer state. ``sharded``: ``model`` / ``optimizer`` hold FSDP2 shards, cut out of
    the checkpoint's unsharded tensors. Raises TrainingError (naming the path) when any part cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model as st_load

    from vlgrpo.model import lora

    try:
        if lora.peft_model(model) is not None and sharded:
            sharding.load_adapter_state(model, load_file(str(path / ADAPTER_FILE)))
        elif sharded:
            sharding.load_full_state_dict(model, load_file(str(path / "model.safetensors")))
        elif lora.peft_model(model) is not None:
            lora.load_trainable_state(model, load_file(str(path / ADAPTER_FILE)))
        else:
            st_load(model, str(path / "model.safetensors"))
        if reference is not None:
            st_load(reference, str(path / REFERENCE_FILE))
        # weights_only: a checkpoint dir is data, never code - a pickle that builds objects is refused.
        opt_state = torch.load(path / "optimizer.pt", weights_only=True)
        if sharded:
            sharding.load_full_optimizer_state(optimizer, opt_state)
        else:
            optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        _set_rng_state(torch.load(path / "rng_state.pt", weights_only=True))
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError,
            SafetensorError, lora.LoraError) as e:
        raise TrainingError(f"{path}: cannot resume from this checkpoint: {e}") from e


def resume(out_dir: Path, model: nn.Module, optimizer, scheduler,
           reference: nn.Module | None = None, sharded: bool = False) -> tuple[Path | None, dict[str, Any]]:
    """Load the newest checkpoint that reads back whole → (its path, its trainer state), or (None, {}).

    An unreadable one (truncated by a crash after the rename, e.g. power loss before the bytes hit the disk)
    is skipped with a warning, so a run resumes from the last good one. Each attempt overwrites weights,
    optimizer, scheduler and RNG entirely. If none reads, the newest one's error is raised: starting over
    silently would throw the work away."""
    errors: list[TrainingError] = []
    for path in complete_checkpoints(out_dir):
        try:
            return path, load_checkpoint(path, model, optimizer, scheduler, reference, sharded)
        except TrainingError as e:
            print(f"warning: skipping unreadable checkpoint: {e}", file=sys.stderr)
            errors.append(e)
    if errors:
        raise errors[0]
    return None, {}


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the metric lines of steps ≤ ``last_step`` (a resumed run re-logs the later ones)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) <= last_step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def save_final(model: nn.Module, processor: Any, out_dir: Path,
               weights: dict[str, torch.Tensor] | None = None) -> None:
    """The trained policy (safetensors + processor) in ``out_dir``, swapped in atomically; checkpoints kept.
    ``weights``: a sharded policy's gathered weights (vlgrpo.train.sharding), saved instead of its own.

    The files' sha256 go with them (``vlgrpo.io.write_content_hashes``), checked whenever the model loads.
    """
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        processor.save_pretrained(tmp)
        write_content_hashes(tmp, "vlgrpo train")
        ck = out_dir / CHECKPOINT_DIR
        if ck.is_dir():
            shutil.move(str(ck), str(tmp / CHECKPOINT_DIR))
