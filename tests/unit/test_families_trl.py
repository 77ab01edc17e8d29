"""TRL's GRPO loss and gradients (the oracle) against ours on every Qwen-VL family's tiny checkpoint
(tests/families.py, loaded through ``base.model`` as a user's download): the hybrid linear-attention
Qwen3.5 families included, through both the shared-work path (cache expanded to the G completions) and the
plain path. One loss type per family keeps this cheap; tests/unit/test_trl_equivalence.py covers every loss
type on the default tiny model."""
from __future__ import annotations

import pytest

from tests.families import FAMILIES, build_family
from tests.unit.test_trl_equivalence import (_assert_grads_close, _make_trl_trainer, _our_loss_and_grads,
                                             _trl_loss_and_grads, make_setup, synthetic_prompts)


# the four families before Qwen3.5 cost a TRL trainer each as well: in the slow set
CASES = [f if f.startswith("qwen3_5") else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]


@pytest.mark.parametrize("family", CASES)
def test_family_loss_and_grads_match_trl(family, tmp_path_factory):
    items, images, texts = synthetic_prompts()
    s = make_setup(build_family(family, texts, tmp_path_factory.mktemp(family)), items, images)
    trl_loss, trl_grads = _trl_loss_and_grads(_make_trl_trainer(s, tmp_path_factory, 1.0), s, "grpo", 0.04, True)
    for shared, tol in ((False, 1e-5), (True, 1e-4)):
        sums, grads = _our_loss_and_grads(s, "grpo", 0.04, True, shared=shared)
        assert sums["loss"] == pytest.approx(trl_loss, abs=tol, rel=tol), shared
        _assert_grads_close(grads, trl_grads, atol=tol)
        print(f"{family} shared={shared}: |dloss| {abs(sums['loss'] - trl_loss):.2e}, max |dgrad| "
              f"{max((grads[n] - trl_grads[n]).abs().max().item() for n in grads):.2e}")
