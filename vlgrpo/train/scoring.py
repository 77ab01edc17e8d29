"""Per-token log-probs of completions under a policy: the one place where the model scores completions.

``CompletionScorer`` wraps a Qwen-VL model so that one ``forward`` gives the logits at every completion
position of a micro-batch (the module DDP / accelerate wrap); ``score_micro_batch`` turns them into per-token
log-probs (and entropies); ``score_batch`` does a whole step without gradients (old policy, reference).

Shared work (``train.shared_work``): the prompt and its image run once per prompt, its KV cache is expanded
to the prompt's completions, and gradients flow back through the expansion into the prompt and the vision
tower. The plain path feeds every completion its own copy of prompt + image, like a generic trainer.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from vlgrpo import grpo
from vlgrpo.config import TrainConfig
from vlgrpo.train.batches import MicroBatch, PromptBatch, micro_batches


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / accelerate wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def completion_positions(model: nn.Module, prompts: PromptBatch, length: int) -> torch.Tensor:
    """3-D (M-RoPE) positions of ``length`` text tokens that follow each prompt: (3, P, length).

    A prompt ends with text (the assistant header), whose three position components are equal; the tokens
    after it continue from there one by one - what ``get_rope_index`` gives on the full sequence.
    """
    base = unwrap(model)
    if hasattr(base, "get_base_model"):       # a peft LoRA model: the transformers model inside it
        base = base.get_base_model()
    pos, _ = base.model.get_rope_index(prompts.input_ids, mm_token_type_ids=prompts.mm_token_type_ids,
                                       image_grid_thw=prompts.image_grid_thw,
                                       attention_mask=prompts.attention_mask)      # (3, P, L)
    last = pos[:, :, -1:]                                                           # (3, P, 1)
    step = torch.arange(1, length + 1, device=pos.device).view(1, 1, -1)
    return last + step                                                              # (3, P, length)


class CompletionScorer(nn.Module):
    """logits of the policy at each completion position, for one micro-batch.

    One ``forward`` per micro-batch, so that the module can be wrapped in DistributedDataParallel (or a
    DeepSpeed engine) as a whole even though the shared path runs the language model twice (prompt, then
    completions from the expanded cache).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, prompts: PromptBatch, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                repeats: int, shared: bool) -> torch.Tensor:
        """Prompts (p, L) each continued by ``repeats`` completions (p·repeats, C) → logits (p·repeats, C, V)."""
        run = self._shared if shared else self._plain
        return run(prompts, completion_ids, completion_mask, repeats)

    def _plain(self, p: PromptBatch, c_ids: torch.Tensor, c_mask: torch.Tensor, r: int) -> torch.Tensor:
        # G full copies of prompt + image: what a generic trainer does
        ids, mask, mm, pv, grid = p.input_ids, p.attention_mask, p.mm_token_type_ids, p.pixel_values, \
            p.image_grid_thw
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

    def _shared(self, p: PromptBatch, c_ids: torch.Tensor, c_mask: torch.Tensor, r: int) -> torch.Tensor:
        # 1) prompt + image once per prompt; keep its KV cache and the logits of its last position
        out = self.model(input_ids=p.input_ids, attention_mask=p.attention_mask,
                         mm_token_type_ids=p.mm_token_type_ids, pixel_values=p.pixel_values,
                         image_grid_thw=p.image_grid_thw, use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1:].repeat_interleave(r, 0)                   # (n, 1, V) predicts token 0
        C = c_ids.shape[1]
        if C == 1:
            return first
        # 2) expand the cache to the r completions of each prompt (repeat_interleave is differentiable, so
        #    gradients of all r completions flow back into the one prompt forward and the vision tower)
        cache = out.past_key_values
        cache.batch_repeat_interleave(r)
        pos = completion_positions(self.model, p, C - 1).repeat_interleave(r, 1)       # (3, n, C-1)
        full_mask = torch.cat([p.attention_mask.repeat_interleave(r, 0), c_mask[:, :-1]], 1)  # (n, L + C - 1)
        rest = self.model(input_ids=c_ids[:, :-1], attention_mask=full_mask, position_ids=pos,
                          past_key_values=cache, use_cache=True)
        return torch.cat([first, rest.logits], 1)                             # (n, C, V)


def score_micro_batch(scorer: nn.Module, mb: MicroBatch, completion_ids: torch.Tensor,
                      completion_mask: torch.Tensor, tc: TrainConfig, with_entropy: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (n, C) of the micro-batch's completions at ``tc.temperature`` (and per-token
    entropies, without gradients, when asked); ``tc.shared_work`` picks the shared or the plain path."""
    c_ids = completion_ids[mb.start:mb.end]
    c_mask = completion_mask[mb.start:mb.end]
    logits = scorer(mb.prompts, c_ids, c_mask, mb.repeats, tc.shared_work)
    logp = grpo.selective_log_softmax(logits, c_ids, tc.temperature)
    ent = None
    if with_entropy:
        with torch.no_grad():
            ent = grpo.entropy_from_logits(logits.detach(), tc.temperature)
    return logp, ent


@torch.no_grad()
def score_batch(scorer: nn.Module, prompts: PromptBatch, completion_ids: torch.Tensor,
                completion_mask: torch.Tensor, tc: TrainConfig, accelerator=None) -> torch.Tensor:
    """Log-probs (N, C) of all completions under ``scorer`` (old policy or reference), no gradients."""
    out = []
    for mb in micro_batches(prompts, tc.num_generations, tc.micro_batch_size):
        with (accelerator.autocast() if accelerator is not None else nullcontext()):
            logp, _ = score_micro_batch(scorer, mb, completion_ids, completion_mask, tc)
        out.append(logp.float())
    return torch.cat(out)
