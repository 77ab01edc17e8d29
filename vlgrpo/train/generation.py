"""Sampling G completions per prompt (the rollout's generation), with a private random stream per prompt.

Shared work: each prompt (images and videos included) is prefilled once and its KV cache expanded to its G samples;
the plain path prefills G copies. Both draw the same tokens from the same generators.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from vlgrpo.model.caches import expand_cache
from vlgrpo.train.backbone import backbone_and_head, unwrap
from vlgrpo.train.batches import PromptBatch
from vlgrpo.train.sampling import SamplingSpec
from vlgrpo.train.state import Completions


def completion_positions(model: nn.Module, prompts: PromptBatch, length: int) -> torch.Tensor:
    """3-D (M-RoPE) positions of ``length`` text tokens that follow each prompt: (3, P, length).

    A prompt ends with text (the assistant header), whose three position components are equal; the tokens
    after it continue from there one by one - what ``get_rope_index`` gives on the full sequence. Generation
    feeds its sampled tokens at these positions; scoring (``vlgrpo.train.scoring``) the completions.
    """
    backbone, _ = backbone_and_head(unwrap(model))
    pos, _ = backbone.get_rope_index(prompts.input_ids, mm_token_type_ids=prompts.mm_token_type_ids,
                                     image_grid_thw=prompts.image_grid_thw,
                                     video_grid_thw=prompts.video_grid_thw,
                                     second_per_grid_ts=prompts.second_per_grid_ts,
                                     attention_mask=prompts.attention_mask)        # (3, P, L)
    last = pos[:, :, -1:]                                                           # (3, P, 1)
    step = torch.arange(1, length + 1, device=pos.device).view(1, 1, -1)
    return last + step                                                              # (3, P, length)


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


def _prefill(model: nn.Module, prompts: PromptBatch, G: int, shared: bool):
    """Run the prompts once → (KV cache for N = P·G rows, last logits (N, V), attention mask (N, L),
    positions (3, N, 1) of the first completion token)."""
    if shared:
        out = model(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                    mm_token_type_ids=prompts.mm_token_type_ids, use_cache=True, logits_to_keep=1,
                    **prompts.vision_kwargs())
        cache = out.past_key_values
        expand_cache(cache, G)
        return (cache, out.logits[:, -1].repeat_interleave(G, 0), prompts.attention_mask.repeat_interleave(G, 0),
                completion_positions(model, prompts, 1).repeat_interleave(G, 1))
    rep = prompts.select([i for i in range(len(prompts)) for _ in range(G)])
    out = model(input_ids=rep.input_ids, attention_mask=rep.attention_mask,
                mm_token_type_ids=rep.mm_token_type_ids, use_cache=True, logits_to_keep=1, **rep.vision_kwargs())
    return out.past_key_values, out.logits[:, -1], rep.attention_mask, completion_positions(model, rep, 1)


@torch.no_grad()
def generate_group_completions(model: nn.Module, prompts: PromptBatch, spec: SamplingSpec,
                               generators: Sequence[torch.Generator], shared: bool = True,
                               all_done: Callable[[bool], bool] | None = None
                               ) -> Completions:
    """G sampled completions per prompt → Completions: ids (N, C) right-padded, mask (N, C), terminated (N,).

    ``mask`` covers each completion up to and including its stop token; C is the longest completion.
    ``generators[p]`` draws prompt p's G samples. Shared: prefill each prompt once, expand its KV cache to G
    rows, then decode token by token. Plain: G copies of each prompt are prefilled
    (``generate(num_return_sequences=G)``-style). ``all_done``: turns this process's "all rows finished" into
    "every process finished" - with sharded weights each forward is a collective, so all processes decode
    until the last one is done (rows already finished feed padding; the result is the same).
    """
    G, P = spec.num_generations, len(prompts)
    cache, logits, mask, next_pos = _prefill(model, prompts, G, shared)
    N, dev = P * G, logits.device
    stops = torch.tensor(sorted(set(spec.stop_ids)), device=dev)
    banned = list(spec.banned_ids)
    tokens = torch.full((N, spec.max_new_tokens), spec.pad_id, dtype=torch.long, device=dev)
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    terminated = torch.zeros(N, dtype=torch.bool, device=dev)
    lengths = torch.zeros(N, dtype=torch.long, device=dev)
    for t in range(spec.max_new_tokens):
        # a sampled <|image_pad|> would read as an image placeholder when the completion is fed back
        # ("image features and image tokens do not match"): vision tokens are never sampled
        logits[:, banned] = float("-inf")
        tok = torch.cat([sample_next(logits[p * G:(p + 1) * G], spec.temperature, spec.top_p, generators[p])
                         for p in range(P)])                                  # each prompt's own stream
        tok = torch.where(done, torch.full_like(tok, spec.pad_id), tok)
        tokens[:, t] = tok
        lengths += (~done).long()
        hit = torch.isin(tok, stops) & ~done
        terminated |= hit
        done |= hit
        finished = bool(done.all())
        if (all_done(finished) if all_done is not None else finished) or t == spec.max_new_tokens - 1:
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
    return Completions(ids, comp_mask, terminated)
