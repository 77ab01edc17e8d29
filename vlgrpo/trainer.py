"""GRPO rollout + update loop on ``accelerate``, with the work shared across each group of G completions.

Run (the ``train`` / ``pilot`` stages call this; it needs ``data/manifest.jsonl`` and ``models/base``):

    from vlgrpo.config import load_config
    from vlgrpo.trainer import train_grpo
    cfg = load_config("params.yaml")
    train_grpo(cfg, cfg.train, ".", "data/manifest.jsonl", "models/base", "models/candidate",
               "reports/train_metrics.jsonl")

    # two CPU processes (gloo):
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m vlgrpo.trainer params.yaml

One step: take the step's prompts → sample G completions each → score them with the reward registry →
group advantages (over the rewards of all processes) → ``num_iterations`` optimizer updates over the batch in
micro-batches of ``micro_batch_size`` completions (gradient accumulation) → metrics line → checkpoint.

How this departs from a textbook / TRL-style implementation - the maths is the same (tests compare loss
and gradients with TRL's ``GRPOTrainer``), the *work* is not:
- shared work per group (``train.shared_work``, default on): generation encodes each prompt (image
  included) once and expands its KV cache to the G samples; every scoring forward (policy, old policy,
  reference) runs the vision tower and the prompt once per prompt and continues the G completions from the
  expanded cache, with gradients flowing back through the cache into the prompt and the vision tower. The
  plain path (``shared_work: false``) feeds G full copies of prompt + image, like generic trainers.
- no reference forward when beta is 0 (no reference model is even loaded), no old-policy forward when
  num_iterations is 1 (ρ = 1 and the old log-probs are the detached current ones).
- every random draw for prompt slot k of step s (its G samples, its augmentation) comes from a generator
  seeded by (seed, s, k), and the data order is a pure function of (seed, epoch): a resumed run replays
  exactly the same draws, and the completions do not depend on how many processes share the step.
- aggregation normalisers are counted over the whole step (see vlgrpo.grpo), so accumulation does not
  change the maths.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from vlgrpo import grpo
from vlgrpo.config import Config, TrainConfig
from vlgrpo.io import atomic_dir, atomic_write_text

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"


class TrainingError(RuntimeError):
    """Training cannot go on (NaN/inf, no usable prompts, bad checkpoint); the message names the step."""


# ================================================================================== batch containers


@dataclass
class PromptBatch:
    """P prompts, left-padded, with their images; produced by ``modeling.encode_prompts``."""
    input_ids: torch.Tensor            # (P, L)
    attention_mask: torch.Tensor       # (P, L)
    mm_token_type_ids: torch.Tensor    # (P, L) 0 text, 1 image
    pixel_values: torch.Tensor | None  # (R, D) patch rows of all images, prompt by prompt
    image_grid_thw: torch.Tensor | None  # (I, 3) one row per image
    images_per_prompt: list[int]

    @classmethod
    def from_encoded(cls, enc: Any, images_per_prompt: Sequence[int]) -> "PromptBatch":
        ids = enc["input_ids"]
        mm = enc.get("mm_token_type_ids")
        if mm is None:
            mm = torch.zeros_like(ids)
        return cls(ids, enc["attention_mask"], mm, enc.get("pixel_values"), enc.get("image_grid_thw"),
                   list(images_per_prompt))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def image_spans(self) -> list[tuple[int, int]]:
        """For each prompt, its rows [start, end) of ``image_grid_thw``."""
        ends = np.cumsum([0] + self.images_per_prompt)
        return [(int(ends[i]), int(ends[i + 1])) for i in range(len(self.images_per_prompt))]

    def pixel_spans(self) -> list[tuple[int, int]]:
        """For each prompt, its rows [start, end) of ``pixel_values``: Σ t·h·w over its images.

        Splitting by ``image_grid_thw`` (never by a fixed row count) is what keeps one sample's patch rows
        together when a batch is cut into micro-batches.
        """
        if self.image_grid_thw is None:
            return [(0, 0)] * len(self)
        rows = self.image_grid_thw.prod(dim=-1).tolist()        # patch rows per image
        per_prompt = [sum(rows[a:b]) for a, b in self.image_spans()]
        ends = np.cumsum([0] + per_prompt)
        return [(int(ends[i]), int(ends[i + 1])) for i in range(len(self))]

    def select(self, idx: Sequence[int]) -> "PromptBatch":
        """Prompts ``idx`` (in that order, repeats allowed), with exactly their image rows; common left padding
        is trimmed so no compute is spent on columns that are padding in every row."""
        idx = list(idx)
        ids, mask, mm = self.input_ids[idx], self.attention_mask[idx], self.mm_token_type_ids[idx]
        first = int((mask.sum(0) > 0).nonzero()[0]) if mask.any() else 0
        ids, mask, mm = ids[:, first:], mask[:, first:], mm[:, first:]
        pv = grid = None
        if self.pixel_values is not None:
            ps, gs = self.pixel_spans(), self.image_spans()
            pv = torch.cat([self.pixel_values[ps[i][0]:ps[i][1]] for i in idx])
            grid = torch.cat([self.image_grid_thw[gs[i][0]:gs[i][1]] for i in idx])
        return PromptBatch(ids, mask, mm, pv, grid, [self.images_per_prompt[i] for i in idx])

    def to(self, device: torch.device) -> "PromptBatch":
        f = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return PromptBatch(f(self.input_ids), f(self.attention_mask), f(self.mm_token_type_ids),
                           f(self.pixel_values), f(self.image_grid_thw), list(self.images_per_prompt))


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


# ========================================================================================= forwards


def completion_positions(model: nn.Module, prompts: PromptBatch, length: int) -> torch.Tensor:
    """3-D (M-RoPE) positions of ``length`` text tokens that follow each prompt: (3, P, length).

    A prompt ends with text (the assistant header), whose three position components are equal; the tokens
    after it continue from there one by one - what ``get_rope_index`` gives on the full sequence.
    """
    base = _base_model(model)
    pos, _ = base.model.get_rope_index(prompts.input_ids, mm_token_type_ids=prompts.mm_token_type_ids,
                                       image_grid_thw=prompts.image_grid_thw,
                                       attention_mask=prompts.attention_mask)      # (3, P, L)
    last = pos[:, :, -1:]                                                           # (3, P, 1)
    step = torch.arange(1, length + 1, device=pos.device).view(1, 1, -1)
    return last + step                                                              # (3, P, length)


def _base_model(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


class CompletionScorer(nn.Module):
    """logits of the policy at each completion position, for one micro-batch.

    One ``forward`` per micro-batch, so that the module can be wrapped in DistributedDataParallel (or a
    DeepSpeed engine) as a whole even though the shared path runs the language model twice (prompt, then
    completions from the expanded cache).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw,
                completion_ids, completion_mask, repeats: int, shared: bool) -> torch.Tensor:
        """Prompts (p, L) each continued by ``repeats`` completions (p·repeats, C) → logits (p·repeats, C, V)."""
        if shared:
            return self._shared(input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw,
                                completion_ids, completion_mask, repeats)
        return self._plain(input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw,
                           completion_ids, completion_mask, repeats)

    def _plain(self, ids, mask, mm, pv, grid, c_ids, c_mask, r):
        # G full copies of prompt + image: what a generic trainer does
        P, C = ids.shape[0], c_ids.shape[1]
        kw = {}
        if pv is not None:
            rows = grid.prod(-1)                                              # rows per image
            per_prompt_imgs = grid.shape[0] // P                              # same count for every prompt
            img_rows = rows.view(P, per_prompt_imgs).sum(1).tolist()
            chunks = torch.split(pv, img_rows)
            kw["pixel_values"] = torch.cat([c for c in chunks for _ in range(r)])
            kw["image_grid_thw"] = grid.view(P, per_prompt_imgs, 3).repeat_interleave(r, 0).reshape(-1, 3)
        full_ids = torch.cat([ids.repeat_interleave(r, 0), c_ids], 1)        # (n, L + C)
        full_mask = torch.cat([mask.repeat_interleave(r, 0), c_mask], 1)
        full_mm = torch.cat([mm.repeat_interleave(r, 0), torch.zeros_like(c_ids)], 1)
        out = self.model(input_ids=full_ids, attention_mask=full_mask, mm_token_type_ids=full_mm,
                         logits_to_keep=C + 1, use_cache=False, **kw)
        return out.logits[:, :-1]                                             # (n, C, V): position t predicts t+1

    def _shared(self, ids, mask, mm, pv, grid, c_ids, c_mask, r):
        # 1) prompt + image once per prompt; keep its KV cache and the logits of its last position
        out = self.model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, pixel_values=pv,
                         image_grid_thw=grid, use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1:].repeat_interleave(r, 0)                   # (n, 1, V) predicts token 0
        C = c_ids.shape[1]
        if C == 1:
            return first
        # 2) expand the cache to the r completions of each prompt (repeat_interleave is differentiable, so
        #    gradients of all r completions flow back into the one prompt forward and the vision tower)
        cache = out.past_key_values
        cache.batch_repeat_interleave(r)
        prompts = PromptBatch(ids, mask, mm, pv, grid, [])
        pos = completion_positions(self.model, prompts, C - 1).repeat_interleave(r, 1)  # (3, n, C-1)
        full_mask = torch.cat([mask.repeat_interleave(r, 0), c_mask[:, :-1]], 1)   # (n, L + C - 1)
        rest = self.model(input_ids=c_ids[:, :-1], attention_mask=full_mask, position_ids=pos,
                          past_key_values=cache, use_cache=True)
        return torch.cat([first, rest.logits], 1)                             # (n, C, V)


def score_micro_batch(scorer: nn.Module, mb: MicroBatch, completion_ids: torch.Tensor,
                      completion_mask: torch.Tensor, shared: bool, temperature: float,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (n, C) of the micro-batch's completions (and entropies when asked)."""
    p = mb.prompts
    c_ids = completion_ids[mb.start:mb.end]
    c_mask = completion_mask[mb.start:mb.end]
    logits = scorer(p.input_ids, p.attention_mask, p.mm_token_type_ids, p.pixel_values, p.image_grid_thw,
                    c_ids, c_mask, mb.repeats, shared)
    logp = grpo.selective_log_softmax(logits, c_ids, temperature)
    ent = None
    if with_entropy:
        with torch.no_grad():
            ent = grpo.entropy_from_logits(logits.detach(), temperature)
    return logp, ent


# ====================================================================================== generation


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row from softmax(logits / T) restricted to the top-p nucleus; (B, V) → (B,)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it stays in)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    if generator is not None and generator.device != probs.device:
        # the per-slot generators live on the CPU (same draws on every device); (G, V) is small to move
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def vision_token_ids(model: nn.Module) -> list[int]:
    """Ids of the image/video placeholder and delimiter tokens, from the model's config."""
    c = _base_model(model).config
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return sorted({int(getattr(c, n)) for n in names if getattr(c, n, None) is not None})


@torch.no_grad()
def generate_group_completions(model: nn.Module, prompts: PromptBatch, num_generations: int,
                               max_new_tokens: int, temperature: float, top_p: float, stop_ids: Sequence[int],
                               pad_id: int, generators: Sequence[torch.Generator], shared: bool = True
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """G sampled completions per prompt → (ids (N, C) right-padded, mask (N, C), terminated (N,)).

    ``mask`` covers each completion up to and including its stop token; C is the longest completion.
    Shared: prefill each prompt once, expand its KV cache to G rows, then decode token by token. Plain: G
    copies of each prompt are prefilled (``generate(num_return_sequences=G)``-style).
    """
    G = num_generations
    P = len(prompts)
    if shared:
        out = model(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                    mm_token_type_ids=prompts.mm_token_type_ids, pixel_values=prompts.pixel_values,
                    image_grid_thw=prompts.image_grid_thw, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(G)
        logits = out.logits[:, -1].repeat_interleave(G, 0)                    # (N, V)
        mask = prompts.attention_mask.repeat_interleave(G, 0)                 # (N, L)
        next_pos = completion_positions(model, prompts, 1).repeat_interleave(G, 1)  # (3, N, 1)
    else:
        rep = prompts.select([i for i in range(P) for _ in range(G)])
        out = model(input_ids=rep.input_ids, attention_mask=rep.attention_mask,
                    mm_token_type_ids=rep.mm_token_type_ids, pixel_values=rep.pixel_values,
                    image_grid_thw=rep.image_grid_thw, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        logits = out.logits[:, -1]
        mask = rep.attention_mask
        next_pos = completion_positions(model, rep, 1)
    N = P * G
    stops = torch.tensor(sorted(set(stop_ids)), device=logits.device)
    banned = vision_token_ids(model)
    tokens = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=logits.device)
    done = torch.zeros(N, dtype=torch.bool, device=logits.device)
    terminated = torch.zeros(N, dtype=torch.bool, device=logits.device)
    lengths = torch.zeros(N, dtype=torch.long, device=logits.device)
    for t in range(max_new_tokens):
        # a sampled <|image_pad|> would read as an image placeholder when the completion is fed back
        # ("image features and image tokens do not match"): vision tokens are never sampled
        logits[:, banned] = float("-inf")
        tok = torch.cat([sample_next(logits[p * G:(p + 1) * G], temperature, top_p, generators[p])
                         for p in range(P)])                                  # each prompt's own stream
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens[:, t] = tok
        lengths += (~done).long()
        hit = torch.isin(tok, stops) & ~done
        terminated |= hit
        done |= hit
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        # every row attends to the token it just fed (a finished row feeds padding nobody reads)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(input_ids=tok.unsqueeze(1), attention_mask=mask, position_ids=next_pos,
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1
    C = max(1, int(lengths.max()))
    ids = tokens[:, :C]
    comp_mask = (torch.arange(C, device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return ids, comp_mask, terminated


# =================================================================================== data and order


def data_order(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of the train items used in ``epoch``: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch, 7919]).permutation(num_items)


def step_prompt_indices(step: int, prompts_per_step: int, num_items: int, seed: int) -> list[int]:
    """Item indices of global step ``step`` (0-based): consecutive slots of the concatenated epoch orders."""
    out = []
    for k in range(step * prompts_per_step, (step + 1) * prompts_per_step):
        epoch, pos = divmod(k, num_items)
        out.append(int(data_order(num_items, seed, epoch)[pos]))
    return out


def step_generator(seed: int, step: int, slot: int, stream: int) -> torch.Generator:
    """A generator private to (seed, step, prompt slot, stream): resume replays the same draws."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, step, slot, stream]).generate_state(1)[0]))
    return g


# ====================================================================================== checkpoints


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


# Keys that do not change what a step computes: a resume may differ in them.
_RESUME_NEUTRAL = ("save_steps", "log_every", "out_dir")


def run_fingerprint(cfg: Config, tc: TrainConfig, init_model_dir: str | Path, items: Sequence[Any]) -> str:
    """What a checkpoint must share with this run to be resumed: the step-defining train settings, rewards,
    pixel budget, the starting weights and the prompt list (ids in order)."""
    import hashlib

    h = hashlib.sha256()
    train = {k: v for k, v in dataclasses.asdict(tc).items() if k not in _RESUME_NEUTRAL}
    h.update(json.dumps({"train": train, "rewards": dataclasses.asdict(cfg.rewards),
                         "pixels": [cfg.data.min_pixels, cfg.data.max_pixels]}, sort_keys=True,
                        default=str).encode())
    for f in sorted(Path(init_model_dir).glob("*.safetensors")):
        st = f.stat()  # size + mtime: checkpoints can be GBs, and a rewritten base gets a new mtime
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update("\n".join(it.id for it in items).encode())
    return h.hexdigest()


def checkpoint_fingerprint(path: Path) -> str | None:
    try:
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError):
        return None


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


def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, state: dict[str, Any]) -> None:
    """Weights (safetensors) + optimizer + scheduler + RNG + trainer state, written to a temp dir and renamed."""
    from safetensors.torch import save_model as st_save

    with atomic_dir(path) as tmp:
        st_save(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng_state.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_model as st_load

    try:
        st_load(model, str(path / "model.safetensors"))
        # weights_only: a checkpoint dir is data, never code - a pickle that builds objects is refused.
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        _set_rng_state(torch.load(path / "rng_state.pt", weights_only=True))
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError,
            SafetensorError) as e:
        raise TrainingError(f"{path}: cannot resume from this checkpoint: {e}") from e


def _resume(out_dir: Path, model: nn.Module, optimizer, scheduler) -> tuple[Path | None, dict[str, Any]]:
    """Load the newest checkpoint that reads back whole; an unreadable one (truncated by a crash after the
    rename, e.g. power loss before the bytes hit the disk) is skipped with a warning, so a run resumes from
    the last good one. Each attempt overwrites weights, optimizer, scheduler and RNG entirely. If none reads,
    the newest one's error is raised: starting over silently would throw the work away."""
    errors: list[TrainingError] = []
    for path in complete_checkpoints(out_dir):
        try:
            return path, load_checkpoint(path, model, optimizer, scheduler)
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


# ============================================================================================ loop


@dataclass
class StepBatch:
    """Everything one process needs for the update phase of one step."""
    prompts: PromptBatch
    completion_ids: torch.Tensor     # (N, C)
    completion_mask: torch.Tensor    # (N, C)
    advantages: torch.Tensor         # (N,)
    old_logp: torch.Tensor | None    # (N, C)
    ref_logp: torch.Tensor | None    # (N, C)


def update_phase(scorer: nn.Module, batch: StepBatch, tc: TrainConfig, *, shared: bool, accelerator,
                 global_num_tokens: float, num_processes: int = 1) -> dict[str, float]:
    """One optimizer step's backward passes: micro-batches, accumulated; returns metric sums (local).

    The loss of each micro-batch is numerator / step normaliser, so the accumulated gradient is the gradient
    of the whole batch's loss.
    """
    mbs = micro_batches(batch.prompts, tc.num_generations, tc.micro_batch_size)
    mask = batch.completion_mask
    norm = grpo.loss_normalizer(tc.loss_type, num_sequences=mask.shape[0], num_tokens=float(mask.sum()),
                                global_num_tokens=global_num_tokens,
                                max_completion_length=tc.max_completion_length, num_processes=num_processes)
    spec = grpo.LossSpec(tc.epsilon_low, tc.epsilon_high, tc.beta, tc.importance_sampling_level)
    sums: dict[str, float] = {"loss": 0.0}
    for i, mb in enumerate(mbs):
        last = i == len(mbs) - 1
        sl = slice(mb.start, mb.end)
        ctx = accelerator.no_sync(scorer) if (accelerator is not None and not last) else _nullcontext()
        with ctx:
            with (accelerator.autocast() if accelerator is not None else _nullcontext()):
                logp, ent = score_micro_batch(scorer, mb, batch.completion_ids, mask, shared, tc.temperature,
                                              with_entropy=True)
            old = batch.old_logp[sl] if batch.old_logp is not None else None
            ref = batch.ref_logp[sl] if batch.ref_logp is not None else None
            keep = (grpo.high_entropy_mask(ent, mask[sl], tc.top_entropy_quantile,
                                           gather=_values_gatherer(accelerator))
                    if tc.top_entropy_quantile < 1.0 else None)
            tl, ratio, kl = grpo.policy_token_loss(logp, old, ref, batch.advantages[sl], mask[sl], spec, keep)
            loss = grpo.aggregate_loss(tl, mask[sl], tc.loss_type, norm)
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
        sums["loss"] += float(loss.detach())
        m = mask[sl]
        _add(sums, "entropy", grpo.masked_sum_count(ent, m))
        if kl is not None:
            _add(sums, "kl", grpo.masked_sum_count(kl, m))
        for name, ind in grpo.clip_indicators(ratio.detach(), batch.advantages[sl], tc.epsilon_low,
                                              tc.epsilon_high).items():
            _add(sums, name, grpo.masked_sum_count(ind, m))
    return sums


def _values_gatherer(accelerator):
    """1-D tensors of different lengths from every process, concatenated (None for one process).

    Padded with a negative sentinel that no entropy can take, gathered, and the sentinel dropped - so the
    high-entropy quantile is taken over the tokens of all processes, as TRL does.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return None

    def gather(values: torch.Tensor) -> torch.Tensor:
        padded = accelerator.pad_across_processes(values, dim=0, pad_index=-1e9)
        everything = accelerator.gather(padded)
        return everything[everything != -1e9]

    return gather


def _add(sums: dict[str, float], name: str, sc: tuple[float, float]) -> None:
    sums[name + "#sum"] = sums.get(name + "#sum", 0.0) + sc[0]
    sums[name + "#count"] = sums.get(name + "#count", 0.0) + sc[1]


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@torch.no_grad()
def score_batch(scorer: nn.Module, prompts: PromptBatch, completion_ids: torch.Tensor,
                completion_mask: torch.Tensor, tc: TrainConfig, shared: bool, accelerator=None) -> torch.Tensor:
    """Log-probs (N, C) of all completions under ``scorer`` (old policy or reference), no gradients."""
    out = []
    for mb in micro_batches(prompts, tc.num_generations, tc.micro_batch_size):
        with (accelerator.autocast() if accelerator is not None else _nullcontext()):
            logp, _ = score_micro_batch(scorer, mb, completion_ids, completion_mask, shared, tc.temperature)
        out.append(logp.float())
    return torch.cat(out)


def _check_finite(step: int, what: str, value: float) -> None:
    if not math.isfinite(value):
        raise TrainingError(f"step {step}: {what} is {value} (not finite); lower train.learning_rate, raise "
                            f"gradient accumulation, or check the rewards")


def _reward_tensor(step: int, per_reward: dict[str, list], names: Sequence[str]) -> torch.Tensor:
    """(N, K) with NaN for None; a NaN/inf score is an error naming the step and the reward."""
    cols = []
    for name in names:
        vals = []
        for v in per_reward[name]:
            if v is None:
                vals.append(float("nan"))
                continue
            if not math.isfinite(float(v)):
                raise TrainingError(f"step {step}: reward {name!r} returned {v} (not finite)")
            vals.append(float(v))
        cols.append(vals)
    return torch.tensor(cols, dtype=torch.float32).T.reshape(-1, len(names))


def train_grpo(cfg: Config, train_cfg: TrainConfig, root: str | Path, manifest: str | Path,
               init_model_dir: str | Path, out_dir: str | Path, metrics_path: str | Path,
               progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """GRPO-train the policy in ``init_model_dir`` on the manifest's train split; see the module docstring.

    Resumes from the newest complete checkpoint in ``out_dir/checkpoints``. ``stop_after``: stop (as if
    killed) after that many steps of this run's step count - checkpoints written so far stay. Returns a summary
    dict (steps, wall time, throughput, final metrics). The final model goes to ``out_dir`` (atomically, the
    checkpoints kept inside it).
    """
    from tqdm.auto import tqdm

    from vlgrpo import modeling, rewards as R
    from vlgrpo.data.manifest import read_manifest

    tc = train_cfg
    root = Path(root)
    manifest = _under(root, manifest)
    out_dir, metrics_path = _under(root, out_dir), _under(root, metrics_path)
    if _under(root, init_model_dir).exists():        # else a hub id, passed as it is
        init_model_dir = _under(root, init_model_dir)
    if tc.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise TrainingError("train.mixed_precision: fp16 needs a GPU (loss scaling); use bf16 or no on CPU")
    accelerator = _accelerator(tc.mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    if tc.prompts_per_step % world:
        raise TrainingError(f"train.prompts_per_step ({tc.prompts_per_step}) must be divisible by the number "
                            f"of processes ({world})")
    shared = tc.shared_work
    torch.manual_seed(tc.seed)
    device = accelerator.device

    # ---- model(s)
    model, processor = modeling.load_model(init_model_dir, dtype=torch.float32)
    model.to(device)
    ref_scorer = None
    if tc.beta > 0:                           # β = 0: no reference model at all
        ref_model, _ = modeling.load_model(init_model_dir, dtype=torch.float32)
        ref_model.to(device).eval().requires_grad_(False)
        ref_scorer = CompletionScorer(ref_model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    total_updates = tc.max_steps * tc.num_iterations
    warmup = grpo.warmup_steps_for(total_updates, tc.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda u: grpo.lr_multiplier(u, total_updates, warmup))
    scorer, optimizer = accelerator.prepare(CompletionScorer(model), optimizer)
    stop_ids = modeling.stop_token_ids(processor, model)
    pad_id = processor.tokenizer.pad_token_id

    # ---- data: the train split, over-long prompts dropped (never truncated: that can cut image tokens)
    items = read_manifest(manifest, split="train")
    if tc.subset is not None:
        items = items[:tc.subset]
    dcfg = cfg.data
    items, dropped = _drop_long_prompts(processor, items, manifest.parent, dcfg, tc.max_prompt_tokens)
    if len(items) < tc.prompts_per_step:
        raise TrainingError(f"{manifest}: only {len(items)} train prompts fit train.max_prompt_tokens="
                            f"{tc.max_prompt_tokens} ({dropped} dropped); need ≥ prompts_per_step "
                            f"({tc.prompts_per_step})")
    weights = dict(cfg.rewards.weights)
    R.load_plugins(cfg.rewards.plugins)
    reward_fns = R.resolve_rewards(list(weights), cfg.rewards, root=root)
    names = list(weights)
    w_tensor = torch.tensor([weights[n] for n in names], dtype=torch.float32)

    # ---- resume
    start_step = 0
    fingerprint = run_fingerprint(cfg, tc, init_model_dir, items)
    # A checkpoint whose state cannot be read is left to _resume (it skips it); one that reads and names
    # another run marks the whole folder as superseded.
    if any(checkpoint_fingerprint(p) not in (None, fingerprint) for p in complete_checkpoints(out_dir)):
        # Checkpoints of another run (other train/reward settings, data or base model): resuming would
        # silently return that run's policy. They are superseded; the previous final model stays in out_dir
        # until this run's model replaces it.
        if accelerator.is_main_process:
            print(f"{out_dir / CHECKPOINT_DIR}: checkpoints from a run with other settings, data or base "
                  f"model - starting a fresh run", file=sys.stderr)
            shutil.rmtree(out_dir / CHECKPOINT_DIR)
        accelerator.wait_for_everyone()
    ckpt, state = _resume(out_dir, _base_model(scorer).model, optimizer, scheduler)
    if ckpt is not None:
        start_step = int(state["step"])
        if accelerator.is_main_process:
            truncate_metrics(metrics_path, start_step)
    accelerator.wait_for_everyone()

    local_p = tc.prompts_per_step // world
    G = tc.num_generations
    history: list[dict[str, Any]] = []
    t_run = time.perf_counter()
    bar = tqdm(total=tc.max_steps, initial=start_step, desc="grpo", dynamic_ncols=True,
               disable=not (progress and accelerator.is_main_process))
    steps_done = 0
    step = start_step
    try:
        for step in range(start_step, tc.max_steps):
            if stop_after is not None and steps_done >= stop_after:
                break
            t0 = time.perf_counter()
            global_idx = step_prompt_indices(step, tc.prompts_per_step, len(items), tc.seed)
            mine = [items[i] for i in global_idx[rank * local_p:(rank + 1) * local_p]]
            slots = list(range(rank * local_p, (rank + 1) * local_p))          # global prompt slots
            imgs = _step_images(mine, manifest.parent, tc, step, slots)
            enc = modeling.encode_prompts(processor, mine, manifest.parent, dcfg.min_pixels, dcfg.max_pixels,
                                          images=imgs)
            prompts = PromptBatch.from_encoded(enc, [len(it.images) for it in mine]).to(device)

            t_enc = time.perf_counter()
            # ---- rollout
            base = _base_model(scorer).model
            base.eval()
            with accelerator.autocast():
                c_ids, c_mask, term = generate_group_completions(
                    base, prompts, G, tc.max_completion_length, tc.temperature, tc.top_p, stop_ids, pad_id,
                    [step_generator(tc.seed, step, k, 0) for k in slots], shared=shared)
            base.train()
            t_gen = time.perf_counter()
            texts = [processor.tokenizer.decode(ids[:int(m.sum())], skip_special_tokens=True).strip()
                     for ids, m in zip(c_ids.tolist(), c_mask)]
            prompts_txt = [it.text for it in mine for _ in range(G)]
            columns: dict[str, list] = {}
            for it in mine:
                for k, v in it.columns().items():
                    columns.setdefault(k, []).extend([v] * G)
            columns["terminated"] = term.tolist()
            try:
                rb = R.compute_rewards(weights, prompts_txt, texts, columns, on_error=cfg.rewards.on_error,
                                       rewards=reward_fns)
            except R.RewardError as e:
                raise TrainingError(f"step {step + 1}: {e}") from e
            local_r = _reward_tensor(step + 1, rb.per_reward, names).to(device)          # (N_local, K)
            all_r = accelerator.gather(local_r).cpu()                                     # (N_global, K)
            total = grpo.total_rewards(all_r, w_tensor)                                   # (N_global,)
            adv_all, std = grpo.group_advantages(total, G, tc.scale_rewards)
            n_local = local_p * G
            adv = adv_all[rank * n_local:(rank + 1) * n_local].to(device)

            t_rew = time.perf_counter()
            # ---- old policy / reference log-probs (only when the maths needs them)
            old_logp = (score_batch(scorer, prompts, c_ids, c_mask, tc, shared, accelerator)
                        if tc.num_iterations > 1 else None)
            ref_logp = (score_batch(ref_scorer, prompts, c_ids, c_mask, tc, shared, accelerator)
                        if ref_scorer is not None else None)
            batch = StepBatch(prompts, c_ids, c_mask, adv, old_logp, ref_logp)
            global_tokens = float(accelerator.gather(c_mask.sum().reshape(1).float()).sum())

            t_score = time.perf_counter()
            # ---- updates
            agg: dict[str, float] = {}
            grad_norms = []
            for _ in range(tc.num_iterations):
                sums = update_phase(scorer, batch, tc, shared=shared, accelerator=accelerator,
                                    global_num_tokens=global_tokens, num_processes=world)
                _check_finite(step + 1, "loss", sums["loss"])
                gn = accelerator.clip_grad_norm_(scorer.parameters(), tc.max_grad_norm)
                gn = float(gn)
                _check_finite(step + 1, "grad_norm", gn)
                grad_norms.append(gn)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                for k, v in sums.items():
                    agg[k] = agg.get(k, 0.0) + v
            dt = time.perf_counter() - t0

            # ---- metrics (reduced over processes)
            keys = sorted(agg)
            red = accelerator.reduce(torch.tensor([agg[k] for k in keys], device=device), "sum").cpu().tolist()
            tot = dict(zip(keys, red))
            lengths = accelerator.gather(c_mask.sum(1).float()).cpu()
            clipped = accelerator.gather((~term).float()).cpu()
            prompt_tok = float(accelerator.gather(prompts.attention_mask.sum().reshape(1).float()).sum())
            n_global = tc.prompts_per_step * G
            row: dict[str, Any] = {
                "step": step + 1,
                "epoch": (step + 1) * tc.prompts_per_step / len(items),
                "loss": tot["loss"] / (world * tc.num_iterations),
                "reward": float(torch.nanmean(total)),
                "reward_std": float(grpo.nan_std(total)),
                "frac_reward_zero_std": grpo.frac_zero_std(std),
            }
            for j, n in enumerate(names):
                col = all_r[:, j]
                row[f"rewards/{n}/mean"] = float(torch.nanmean(col)) if (~torch.isnan(col)).any() else None
            for name in ["kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]:
                if name + "#sum" in tot:
                    row[name] = tot[name + "#sum"] / max(tot[name + "#count"], 1.0)
            row.update({
                "completions/mean_length": float(lengths.mean()),
                "completions/min_length": float(lengths.min()),
                "completions/max_length": float(lengths.max()),
                "completions/clipped_ratio": float(clipped.mean()),
                "grad_norm": grad_norms[-1],
                "learning_rate": scheduler.get_last_lr()[0],
                "samples_per_s": n_global / dt,
                "tokens_per_s": (prompt_tok * G + float(lengths.sum())) / dt,
                "step_time_s": dt,
                # where the step's time went (this process): prompt encoding, sampling, rewards,
                # old-policy / reference scoring, forward+backward+optimizer
                "time/encode_s": t_enc - t0, "time/generate_s": t_gen - t_enc, "time/rewards_s": t_rew - t_gen,
                "time/score_s": t_score - t_rew, "time/update_s": t0 + dt - t_score,
            })
            for k in ("reward", "loss"):
                _check_finite(step + 1, k, row[k])
            if accelerator.is_main_process:
                metrics_path.parent.mkdir(parents=True, exist_ok=True)
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                    f.flush()
            history.append(row)
            steps_done += 1
            bar.update(1)
            bar.set_postfix(step=step + 1, reward=f"{row['reward']:.3f}", refresh=False)

            # ---- checkpoint
            if (step + 1) % tc.save_steps == 0 or step + 1 == tc.max_steps:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    save_checkpoint(out_dir / CHECKPOINT_DIR / f"step-{step + 1}", _base_model(scorer).model,
                                    optimizer, scheduler,
                                    {"step": step + 1, "seed": tc.seed, "num_items": len(items),
                                     "data_order": {"seed": tc.seed, "prompts_per_step": tc.prompts_per_step,
                                                    "next_slot": (step + 1) * tc.prompts_per_step},
                                     "train_config": dataclasses.asdict(tc), "fingerprint": fingerprint})
                accelerator.wait_for_everyone()
    finally:
        bar.close()

    finished = start_step + steps_done >= tc.max_steps
    final_model = _base_model(scorer).model
    if finished and accelerator.is_main_process:
        _save_final(final_model, processor, out_dir)
    accelerator.wait_for_everyone()
    wall = time.perf_counter() - t_run
    sps = [h["samples_per_s"] for h in history]
    return {
        "steps": start_step + steps_done, "max_steps": tc.max_steps, "finished": finished,
        "resumed_from": start_step if ckpt is not None else None, "wall_s": wall,
        "samples_per_s": float(np.median(sps)) if sps else None,
        "tokens_per_s": float(np.median([h["tokens_per_s"] for h in history])) if history else None,
        "num_prompts": len(items), "dropped_prompts": dropped, "num_processes": world,
        "mixed_precision": tc.mixed_precision, "shared_work": shared, "device": str(device),
        "final": history[-1] if history else None, "out_dir": str(out_dir), "metrics_path": str(metrics_path),
    }


def _accelerator(mixed_precision: str):
    """An Accelerator for this run. accelerate keeps its state per process; a second run in the same process
    (pilot then train, or tests) may ask for another precision, so the precision part of that state is reset
    (the process group, if any, is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def _under(root: Path, p: str | Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else root / p


def _drop_long_prompts(processor, items, manifest_dir: Path, dcfg, max_tokens: int):
    """Items whose encoded prompt (image tokens included) fits ``max_tokens``; over-long ones are dropped."""
    from vlgrpo import modeling

    keep, dropped = [], 0
    for start in range(0, len(items), 64):
        chunk = items[start:start + 64]
        enc = modeling.encode_prompts(processor, chunk, manifest_dir, dcfg.min_pixels, dcfg.max_pixels)
        for it, n in zip(chunk, enc["attention_mask"].sum(1).tolist()):
            if n <= max_tokens:
                keep.append(it)
            else:
                dropped += 1
    return keep, dropped


def _step_images(items, manifest_dir: Path, tc: TrainConfig, step: int, slots: Sequence[int]):
    """The images of this step's prompts: augmented (label-preserving) when ``train.augment`` is on."""
    if not tc.augment:
        return None
    from vlgrpo import augment, modeling

    out = []
    for it, k in zip(items, slots):
        rng = np.random.default_rng([tc.seed, step, k, 1])               # this prompt slot's own stream
        out.append([augment.augment_image(modeling.IMAGE_CACHE.get(manifest_dir / rel), it, rng)
                    for rel in it.images])
    return out


def _save_final(model: nn.Module, processor, out_dir: Path) -> None:
    """The trained policy (safetensors + processor) in ``out_dir``, swapped in atomically; checkpoints kept."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        ck = out_dir / CHECKPOINT_DIR
        if ck.is_dir():
            shutil.move(str(ck), str(tmp / CHECKPOINT_DIR))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlgrpo.trainer params.yaml [out_dir] [metrics]``: the train section on the default paths."""
    from vlgrpo.config import load_config

    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = load_config(argv[0] if argv else "params.yaml")
    out = argv[1] if len(argv) > 1 else cfg.train.out_dir
    metrics = argv[2] if len(argv) > 2 else "reports/train_metrics.jsonl"
    summary = train_grpo(cfg, cfg.train, ".", Path(cfg.data.out_dir) / "manifest.jsonl", cfg.base.out_dir,
                         out, metrics)
    if int(os.environ.get("RANK", "0")) == 0:          # one summary line, from the main process
        print(json.dumps({k: v for k, v in summary.items() if k != "final"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
