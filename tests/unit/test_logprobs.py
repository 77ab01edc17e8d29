"""vlgrpo.algo.logprobs: chunked head + log-softmax equals the full-logits computation, gradients included, and
never keeps more than one chunk of logits for the backward pass."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlgrpo.algo import grpo
from vlgrpo.algo.logprobs import completion_logprobs, exclusion_bias
from tests.settings import tuned_config

N, C, H, V = 5, 7, 16, 97
# Chunking changes only the row count of the head's matmul, and BLAS may round a logit differently in its last
# bit or two for another row count (measured: logits up to 1.9e-6 apart at |logit| ~16; with one chunk the
# result is bitwise the unchunked one, asserted below). Everything after the matmul is the same arithmetic. So
# the log-prob bound is 1e-6 absolute plus 1e-6 relative: a pure 1e-6 absolute bound is below fp32's resolution
# here (|log p| reaches 29 at T=0.7, where 1 ulp is 1.9e-6; measured over 20 seeds: max |diff| 3.8e-6).
TOL = dict(atol=1e-6, rtol=1e-6)


# Gradients are sums over positions, accumulated chunk by chunk instead of in one matmul: 1e-5.
GRAD_TOL = dict(atol=1e-5, rtol=1e-5)


def close(a: torch.Tensor, b: torch.Tensor, tol=TOL) -> bool:
    return bool(((a - b).abs() <= tol["atol"] + tol["rtol"] * b.abs()).all())


def _inputs(seed: int = 0, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    targets = torch.randint(0, V, (N, C), generator=g)
    return hidden, weight, b, targets


def _full(hidden, weight, b, targets, temperature):
    logits = F.linear(hidden, weight, b)                      # (N, C, V) at once: what the trainer did
    return (grpo.selective_log_softmax(logits, targets, temperature),
            grpo.entropy_from_logits(logits.detach(), temperature))


@pytest.mark.parametrize("chunk", [1, 3, 8, N * C, 10_000])
@pytest.mark.parametrize("temperature,bias", [(1.0, False), (0.7, True)])
def test_equals_full_logits_values_and_gradients(chunk, temperature, bias):
    hidden, weight, b, targets = _inputs(bias=bias)
    want, want_ent = _full(hidden, weight, b, targets, temperature)
    g_out = torch.randn(N, C, generator=torch.Generator().manual_seed(1))
    params = [hidden, weight] + ([b] if bias else [])
    want_grads = torch.autograd.grad((want * g_out).sum(), params)
    got, got_ent = completion_logprobs(hidden, weight, targets, temperature=temperature, chunk_size=chunk,
                                       bias=b, with_entropy=True)
    got_grads = torch.autograd.grad((got * g_out).sum(), params)
    assert got.dtype == torch.float32 and got.shape == (N, C)
    assert close(got, want) and close(got_ent, want_ent)
    if chunk >= N * C:            # one chunk: the same matmul, the same arithmetic after it - the same bits
        assert torch.equal(got, want) and torch.equal(got_ent, want_ent)
    for a, w in zip(got_grads, want_grads):
        assert close(a, w, GRAD_TOL)


def test_no_grad_and_without_entropy():
    hidden, weight, _, targets = _inputs()
    want, _ = _full(hidden, weight, None, targets, 1.0)
    with torch.no_grad():
        got, ent = completion_logprobs(hidden, weight, targets, chunk_size=4)
    assert ent is None and not got.requires_grad
    assert close(got, want.detach())


def test_bf16_autocast_matches_full_logits_under_the_same_autocast():
    hidden, weight, _, targets = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = _full(hidden, weight, None, targets, 0.7)
        got, _ = completion_logprobs(hidden, weight, targets, temperature=0.7, chunk_size=6)
    assert got.dtype == torch.float32
    assert close(got, want)


def _saved_for_backward(fn) -> list[torch.Size]:
    """Shapes of every tensor autograd saves while ``fn`` runs."""
    shapes: list[torch.Size] = []

    def pack(t):
        shapes.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_backward_keeps_at_most_one_chunk_of_logits():
    """The full computation saves (N, C, V) logits for the backward pass; the chunked one saves only its
    inputs (hidden rows, the head weight), and recomputes one chunk of logits at a time."""
    hidden, weight, _, targets = _inputs()
    full = _saved_for_backward(lambda: _full(hidden, weight, None, targets, 1.0)[0].sum().backward())
    assert max(s.numel() for s in full) >= N * C * V
    chunk = 4
    shapes = _saved_for_backward(
        lambda: completion_logprobs(hidden, weight, targets, chunk_size=chunk)[0].sum().backward())
    # nothing vocabulary-sized except the head weight itself (V x H), which the full path saves too
    logits_like = [s for s in shapes if V in s and tuple(s) != (V, H)]
    assert all(s.numel() <= chunk * V for s in logits_like), logits_like


def test_rejects_a_bad_chunk_size():
    hidden, weight, _, targets = _inputs()
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        completion_logprobs(hidden, weight, targets, chunk_size=0)


def test_logprob_chunk_is_resume_neutral(tmp_path):
    """Lowering train.logprob_chunk after running out of memory resumes the run instead of restarting it."""
    import dataclasses
    from types import SimpleNamespace

    from vlgrpo.train.checkpoint import run_fingerprint

    init = tmp_path / "base"
    init.mkdir()
    (init / "model.safetensors").write_bytes(b"x")
    cfg, items = tuned_config(), [SimpleNamespace(id="a")]
    smaller = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, logprob_chunk=64))
    assert run_fingerprint(cfg, init, items) == run_fingerprint(smaller, init, items)


def test_excluded_ids_are_taken_out_of_the_distribution():
    """``exclusion_bias``: the distribution a sampler that never draws those ids samples from (the vision placeholder
    ids of the rollout engines): renormalised over the other ids, in every chunk, entropy included."""
    hidden, weight, _, targets = _inputs(3)
    banned = torch.tensor([2, 40, 96])
    targets = targets.masked_fill(torch.isin(targets, banned), 0)
    with torch.no_grad():
        logits = F.linear(hidden, weight).float() / 0.7
        logits[..., banned] = float("-inf")
        want = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        p = torch.softmax(logits, -1)
        want_ent = -(p * torch.log_softmax(logits, -1).nan_to_num(neginf=0.0)).sum(-1)
    got, ent = completion_logprobs(hidden, weight, targets, temperature=0.7, chunk_size=4, with_entropy=True,
                                   bias=exclusion_bias(weight, None, banned))
    assert close(got.detach(), want) and close(ent, want_ent)
    plain, _ = completion_logprobs(hidden, weight, targets, temperature=0.7, chunk_size=4)
    assert (got.detach() > plain.detach()).all()          # the banned mass is gone from every position


@pytest.mark.parametrize("chunk", [3, N * C])
def test_entropy_grad_equals_the_full_logits_entropy_gradient(chunk):
    """``with_entropy="grad"`` (train.entropy_coef): the entropies carry the gradient of H = −Σ p log p of the full
    logits; without it they are a detached metric."""
    hidden, weight, b, targets = _inputs(bias=True)
    params = [hidden, weight, b]
    g_out = torch.randn(N, C, generator=torch.Generator().manual_seed(2))
    want = grpo.entropy_from_logits(F.linear(hidden, weight, b), 0.7)
    want_grads = torch.autograd.grad((want * g_out).sum(), params)
    _, ent = completion_logprobs(hidden, weight, targets, temperature=0.7, chunk_size=chunk, bias=b,
                                 with_entropy="grad")
    assert close(ent, want)
    for a, w in zip(torch.autograd.grad((ent * g_out).sum(), params), want_grads):
        assert close(a, w, GRAD_TOL)
    _, detached = completion_logprobs(hidden, weight, targets, temperature=0.7, chunk_size=chunk, bias=b,
                                      with_entropy=True)
    assert not detached.requires_grad and torch.equal(detached, ent.detach())
