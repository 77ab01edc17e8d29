"""Memory-lean per-token log-probs: the language-model head, the log-softmax and the token pick, in chunks.

    from vlgrpo.algo.logprobs import completion_logprobs
    logp, entropy = completion_logprobs(hidden, model.lm_head.weight, completion_ids, temperature=0.7,
                                        chunk_size=512, with_entropy=True)      # (N, C), (N, C)

A policy-gradient step needs one number per completion token: log softmax(logits / T) at the sampled token
(and, as a metric, the entropy of that distribution). Computing it the direct way materialises the logits
of every completion token over the whole vocabulary at once: N completions x C tokens x 151,936 entries,
in fp32 for the log-softmax - 16 completions of 256 tokens are 2.5 GB, and autograd keeps them (and the
log-softmax output) until the backward pass. Here the head runs on ``chunk_size`` token positions at a time
on the hidden states of the completion positions only, the log-softmax is taken inside the chunk and only
the picked log-prob (and the entropy) leave it; so at most one chunk's logits exist at any moment.

With gradients, each chunk runs under ``torch.utils.checkpoint`` (non-reentrant): autograd keeps only the
chunk's inputs (its rows of hidden states, the shared head weight) and recomputes the chunk's logits during
the backward pass, one chunk at a time. The extra cost is one more head matmul per chunk in the backward.

The arithmetic per token is the same as ``vlgrpo.algo.grpo.selective_log_softmax`` / ``entropy_from_logits`` on
full logits (logits in the compute dtype, upcast to fp32, divided by T), so the result equals the unchunked
one to float rounding (<= 1e-6 in fp32, tests/unit/test_logprobs.py), gradients included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
           temperature: float, with_entropy: bool | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, H) hidden rows → (k,) log-probs of ``targets`` and (k,) entropies (zeros when not asked;
    differentiable with ``with_entropy="grad"``, for the entropy bonus)."""
    logits = F.linear(hidden, weight, bias).float()          # compute dtype (autocast), then fp32
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logp = picked - torch.logsumexp(logits, dim=-1)
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    if with_entropy == "grad":
        full = torch.log_softmax(logits, dim=-1)
        return logp, -(full.exp() * full.masked_fill(torch.isinf(full), 0.0)).sum(-1)
    with torch.no_grad():                                     # a metric: no gradient through it
        full = torch.log_softmax(logits.detach(), dim=-1)
        ent = -(full.exp() * full.masked_fill(torch.isinf(full), 0.0)).sum(-1)     # excluded ids add 0
    return logp, ent


def completion_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                        temperature: float = 1.0, chunk_size: int = 512, bias: torch.Tensor | None = None,
                        with_entropy: bool | str = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log softmax(head(hidden) / T)[targets], ``chunk_size`` positions at a time.

    hidden: (N, C, H), the hidden state at the position that predicts each target token; weight: (V, H)
    (and bias (V,)), the language-model head; targets: (N, C) token ids. Returns (log-probs (N, C) fp32,
    entropies (N, C) fp32 or None). Differentiable in ``hidden`` and ``weight``; the entropies only with
    ``with_entropy="grad"`` (``train.entropy_coef``: otherwise they are a metric and carry no graph).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n, c, h = hidden.shape
    flat_h, flat_t = hidden.reshape(n * c, h), targets.reshape(n * c)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logps, ents = [], []
    for s in range(0, n * c, chunk_size):
        args = (flat_h[s:s + chunk_size], weight, bias, flat_t[s:s + chunk_size], temperature, with_entropy)
        lp, ent = checkpoint(_chunk, *args, use_reentrant=False) if grad else _chunk(*args)
        logps.append(lp)
        ents.append(ent)
    logp = torch.cat(logps).view(n, c) if logps else hidden.new_zeros(n, c, dtype=torch.float32)
    if not with_entropy:
        return logp, None
    ent = torch.cat(ents).view(n, c) if ents else torch.zeros_like(logp)
    return logp, (ent if with_entropy == "grad" else ent.detach())


def exclusion_bias(weight: torch.Tensor, bias: torch.Tensor | None, exclude: torch.Tensor) -> torch.Tensor:
    """A head bias (V,) that takes the ids ``exclude`` out of the distribution: ``bias`` (or zeros) with -inf
    at those ids. Passed as ``completion_logprobs``' ``bias``, the log-probs are those of a sampler that never
    draws them (renormalised over the other ids)."""
    base = bias.detach().float() if bias is not None else weight.new_zeros(weight.shape[0], dtype=torch.float32)
    return base.index_fill(0, exclude.to(base.device), float("-inf")).to(weight.dtype)


__all__ = ["completion_logprobs", "exclusion_bias"]
