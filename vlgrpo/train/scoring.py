"""Per-token log-probs of completions under a policy: the one place where the model scores completions.

``CompletionScorer`` wraps a Qwen-VL model so that one ``forward`` gives the per-token log-probs (and
entropies) of every completion of a micro-batch (the module DDP / accelerate wrap); ``score_micro_batch``
slices the micro-batch's completions; ``score_batch`` does a whole step without gradients (old policy,
reference).

Memory-lean: the language model runs without its head and returns hidden states; only the completion
positions' hidden states go through the head, ``train.logprob_chunk`` tokens at a time, fused with the
log-softmax (``vlgrpo.algo.logprobs``). No (completions x tokens x vocabulary) logits tensor is ever built, in the
forward or the backward pass.

Shared work (``train.shared_work``): the prompt and its images / videos run once per prompt, its KV cache is
expanded to the prompt's completions, and gradients flow back through the expansion into the prompt and the
vision tower. The plain path feeds every completion its own copy of prompt + images / videos, like a generic
trainer.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from vlgrpo.config import TrainConfig
from vlgrpo.algo.logprobs import completion_logprobs, exclusion_bias
from vlgrpo.model.caches import expand_cache
from vlgrpo.train.backbone import backbone_and_head
from vlgrpo.train.batches import MicroBatch, PromptBatch, micro_batches
from vlgrpo.train.generation import completion_positions, generate_group_completions
from vlgrpo.train.sampling import SamplingSpec
from vlgrpo.train.state import Completions


class CompletionScorer(nn.Module):
    """Per-token log-probs of the policy for one micro-batch's completions.

    One ``forward`` per micro-batch, so that the module can be wrapped in DistributedDataParallel (or a
    DeepSpeed engine) as a whole even though the shared path runs the language model twice (prompt, then
    completions from the expanded cache); the head runs inside it too, so sharded wrappers see every use of
    its weight.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, prompts: PromptBatch, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                repeats: int, shared: bool, head: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts (p, L) each continued by ``repeats`` completions (p·repeats, C) → (log-probs, entropies)
        (p·repeats, C) fp32; ``head``: ``completion_logprobs`` keywords (temperature, chunk_size,
        with_entropy; and "exclude": token ids taken out of the distribution, ``exclusion_bias``)."""
        backbone, lm_head = backbone_and_head(self.model)
        run = self._shared if shared else self._plain
        hidden = run(backbone, prompts, completion_ids, completion_mask, repeats)     # (n, C, H)
        head = dict(head)
        exclude = head.pop("exclude", None)
        bias = lm_head.bias if exclude is None else exclusion_bias(lm_head.weight, lm_head.bias, exclude)
        logp, ent = completion_logprobs(hidden, lm_head.weight, completion_ids, bias=bias, **head)
        # not a view: a sharded (FSDP2) root hooks its backward on this output, and a hook on a view can be
        # dropped by an in-place op downstream (torch warns); (n, C) floats cost nothing to copy
        return (logp.clone() if logp.requires_grad else logp), ent

    def generate(self, prompts: PromptBatch, spec: SamplingSpec, generators, shared: bool,
                 all_done=None) -> Completions:
        """``vlgrpo.train.generation.generate_group_completions`` with this policy: a method of the wrapped
        module, so that a sharded scorer (registered as an FSDP forward method, vlgrpo.train.sharding) gathers
        its root weights - embeddings, tied head - before decoding."""
        return generate_group_completions(self.model, prompts, spec, generators, shared=shared, all_done=all_done)

    def _plain(self, backbone: nn.Module, p: PromptBatch, c_ids: torch.Tensor, c_mask: torch.Tensor,
               r: int) -> torch.Tensor:
        # r full copies of each prompt + its images / videos (cut by image_grid_thw / video_grid_thw, so
        # prompts may carry different numbers of them): what a generic trainer does
        rep = p.select([i for i in range(len(p)) for _ in range(r)])
        L, C = rep.input_ids.shape[1], c_ids.shape[1]
        out = backbone(input_ids=torch.cat([rep.input_ids, c_ids], 1),
                       attention_mask=torch.cat([rep.attention_mask, c_mask], 1),
                       mm_token_type_ids=torch.cat([rep.mm_token_type_ids, torch.zeros_like(c_ids)], 1),
                       use_cache=False, **rep.vision_kwargs())
        return out.last_hidden_state[:, L - 1:L + C - 1]                       # position t predicts t+1

    def _shared(self, backbone: nn.Module, p: PromptBatch, c_ids: torch.Tensor, c_mask: torch.Tensor,
                r: int) -> torch.Tensor:
        # 1) prompt + images / videos once per prompt; keep its KV cache and the hidden state of its last position
        out = backbone(input_ids=p.input_ids, attention_mask=p.attention_mask,
                       mm_token_type_ids=p.mm_token_type_ids, use_cache=True, **p.vision_kwargs())
        first = out.last_hidden_state[:, -1:].repeat_interleave(r, 0)         # (n, 1, H) predicts token 0
        C = c_ids.shape[1]
        if C == 1:
            return first
        # 2) expand the cache (key/value and linear-attention states) to the r completions of each prompt
        #    (repeat_interleave is differentiable, so gradients of all r completions flow back into the one
        #    prompt forward and the vision tower)
        cache = out.past_key_values
        expand_cache(cache, r)
        pos = completion_positions(self.model, p, C - 1).repeat_interleave(r, 1)       # (3, n, C-1)
        full_mask = torch.cat([p.attention_mask.repeat_interleave(r, 0), c_mask[:, :-1]], 1)  # (n, L + C - 1)
        rest = backbone(input_ids=c_ids[:, :-1], attention_mask=full_mask, position_ids=pos,
                        past_key_values=cache, use_cache=True)
        return torch.cat([first, rest.last_hidden_state], 1)                  # (n, C, H)


def score_micro_batch(scorer: nn.Module, mb: MicroBatch, completion_ids: torch.Tensor,
                      completion_mask: torch.Tensor, tc: TrainConfig, with_entropy: bool | str = False,
                      exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (n, C) of the micro-batch's completions at ``tc.temperature`` (and per-token
    entropies when asked: without gradients unless ``with_entropy="grad"``, the entropy bonus's case);
    ``tc.shared_work`` picks the shared or the plain path. ``exclude``: token ids taken out of the
    distribution (``exclusion_bias``)."""
    c_ids = completion_ids[mb.start:mb.end]
    c_mask = completion_mask[mb.start:mb.end]
    head = {"temperature": tc.temperature, "chunk_size": tc.logprob_chunk, "with_entropy": with_entropy}
    if exclude is not None:
        head["exclude"] = exclude
    return scorer(mb.prompts, c_ids, c_mask, mb.repeats, tc.shared_work, head)


@torch.no_grad()
def score_batch(scorer: nn.Module, prompts: PromptBatch, completion_ids: torch.Tensor,
                completion_mask: torch.Tensor, tc: TrainConfig, accelerator=None,
                exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probs (N, C) of all completions under ``scorer`` (old policy or reference), no gradients;
    ``exclude`` as in ``score_micro_batch``."""
    out = []
    for mb in micro_batches(prompts, tc.num_generations, tc.micro_batch_size):
        with (accelerator.autocast() if accelerator is not None else nullcontext()):
            logp, _ = score_micro_batch(scorer, mb, completion_ids, completion_mask, tc, exclude=exclude)
        out.append(logp.float())
    return torch.cat(out)
