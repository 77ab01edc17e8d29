"""The trainer's options in the real training loop (vlgrpo.train) on a tiny Qwen2.5-VL: GSPO / entropy masking /
truncation masking settings train, TR-DPO reference sync (TRL's schedule and mixing, checkpointed for an exact
resume), dynamic sampling (tied groups replaced, logged, exact resume), the newer objectives (cispo / sapo,
rloo / reinforce_pp, gdpo, entropy_coef: train and resume exactly), evaluation during training and
keep_best, and the run's watch stopping on tied rewards."""
import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file, load_model

from vlgrpo.model import loading
from tests.tiny_setup import tiny_project, tiny_train_cfg
from vlgrpo.train.loop import train_grpo
from vlgrpo.train.paths import RunPaths

# text_length: spread on an untrained model. half_tied: the same on even item ids, a constant 0.5 on odd ones
# (their groups tie: no signal), so dynamic sampling has groups to drop.
PLUGIN = textwrap.dedent('''
    from vlgrpo.rewards import register

    @register("feat_text_length")
    def feat_text_length(prompts, completions, **columns):
        return [min(len(c), 20) / 20.0 for c in completions]

    @register("late_tie")
    def late_tie(prompts, completions, trainer_state, **columns):
        # spread over the completions' text in steps 1-2, then every group ties (no signal)
        if trainer_state.global_step >= 2:
            return [0.5] * len(completions)
        return [(sum(map(ord, c)) % 97) / 97.0 for c in completions]

    @register("half_tied")
    def half_tied(prompts, completions, id, **columns):
        return [min(len(c), 20) / 20.0 if int(i.rsplit("-", 1)[1]) % 2 == 0 else 0.5
                for c, i in zip(completions, id)]
''')


def make_cfg(project, weights=None, **train):
    return tiny_train_cfg(project, weights or {"feat_text_length": 1.0, "format": 0.1}, num_val=4,
                          **{"max_steps": 3, **train})


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("feat")
    return tiny_project(root, make_cfg(root), PLUGIN)


def run(project, name, stop_after=None, **train):
    cfg = make_cfg(project, **train)
    paths = RunPaths.under(project, "data/manifest.jsonl", "models/base", f"out/{name}", f"reports/{name}.jsonl")
    return train_grpo(cfg, paths, progress=False, stop_after=stop_after)


def rows(project, name):
    return [json.loads(ln) for ln in (project / f"reports/{name}.jsonl").read_text().splitlines()]


def weights(path):
    return load_file(path)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_timing(r):
    return {k: v for k, v in r.items() if not (k.startswith("time/") or k in ("samples_per_s", "tokens_per_s",
                                                                             "step_time_s", "eval/seconds"))}


def test_gspo_entropy_and_truncation_settings_train(project):
    base = weights(project / "models/base/model.safetensors")
    s = run(project, "gspo", importance_sampling_level="sequence_token", num_iterations=2,
            top_entropy_quantile=0.5, beta=0.04, epsilon_high=0.28)
    assert s["finished"]
    assert all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in rows(project, "gspo"))
    assert not same(weights(project / "out/gspo/model.safetensors"), base)
    # the untrained tiny model runs every completion into the 4-token limit: with
    # mask_truncated_completions all of them are left out, so nothing is learned (loss and gradient 0)
    run(project, "masked", mask_truncated_completions=True, beta=0.04)
    rs = rows(project, "masked")
    assert all(r["completions/clipped_ratio"] == 1.0 and r["loss"] == 0.0 and r["grad_norm"] == 0.0 for r in rs)
    assert same(weights(project / "out/masked/model.safetensors"), base)


def loaded(project, path=None):
    """The tiny model with the weights of a safetensors file (tied weights are stored once: compare models,
    not files)."""
    model = loading.load_model(project / "models/base")[0]
    if path is not None:
        load_model(model, str(path))
    return model


def params_equal(a, b, atol=0.0):
    return all(torch.allclose(p, q, atol=atol, rtol=0) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_reference_sync_follows_trl_and_is_checkpointed(project):
    """Every 2nd optimizer update π_ref ← 0.6·π_θ + 0.4·π_ref (TRL's SyncRefModelCallback on the same
    weights), the reference rides in the checkpoints, and a run resumed after the sync ends bit-identical."""
    from trl.trainer.callbacks import SyncRefModelCallback

    kw = dict(beta=0.04, sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.6)
    run(project, "sync", **kw)
    ck = project / "out/sync/checkpoints"
    base = loaded(project)
    assert params_equal(loaded(project, ck / "step-1/ref_model.safetensors"), base)   # no sync after update 1
    trl_ref = loaded(project)
    SyncRefModelCallback._sync_target_model(loaded(project, ck / "step-2/model.safetensors"), trl_ref, 0.6)
    synced = loaded(project, ck / "step-2/ref_model.safetensors")
    assert params_equal(synced, trl_ref, atol=1e-6) and not params_equal(synced, base)
    assert params_equal(loaded(project, ck / "step-3/ref_model.safetensors"), synced)  # none after update 3
    # killed after the synced checkpoint, resumed: the same final policy bit for bit
    run(project, "sync_resumed", stop_after=2, **kw)
    run(project, "sync_resumed", **kw)
    assert same(weights(project / "out/sync_resumed/model.safetensors"),
                weights(project / "out/sync/model.safetensors"))


@pytest.mark.parametrize("opts", [
    dict(loss_type="cispo", advantage_estimator="rloo", epsilon_low=1.0, epsilon_high=4.0),
    dict(loss_type="sapo", advantage_estimator="reinforce_pp"),
    dict(scale_rewards="gdpo", entropy_coef=0.05, top_entropy_quantile=0.5),
], ids=["cispo-rloo", "sapo-reinforce_pp", "gdpo-entropy_coef"])
def test_newer_objectives_train_and_resume_exactly(project, opts):
    """Each option on, 3 steps with two updates per rollout (so cispo / sapo are not the on-policy clipped
    surrogate): it learns, and a run stopped after step 2 and resumed gives the same metric rows and the same
    final weights bit for bit."""
    name = "obj_" + "_".join(f"{v}" for v in opts.values()).replace(".", "")
    kw = dict(num_iterations=2, beta=0.04, **opts)
    run(project, name, **kw)
    rs = rows(project, name)
    assert all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in rs)
    if opts.get("loss_type") == "cispo":
        assert all("cispo_clip_ratio" in r and "clip_ratio/region_mean" not in r for r in rs)
    assert not same(weights(project / f"out/{name}/model.safetensors"),
                    weights(project / "models/base/model.safetensors"))
    run(project, name + "_resumed", stop_after=2, **kw)
    assert run(project, name + "_resumed", **kw)["resumed_from"] == 2
    assert [without_timing(r) for r in rows(project, name + "_resumed")] == [without_timing(r) for r in rs]
    assert same(weights(project / f"out/{name}_resumed/model.safetensors"),
                weights(project / f"out/{name}/model.safetensors"))


def test_dynamic_sampling_replaces_tied_groups_and_resumes_exactly(project):
    kw = dict(weights={"half_tied": 1.0}, dynamic_sampling=True, max_resample_rounds=3, max_steps=4)
    run(project, "dyn", **kw)
    rs = rows(project, "dyn")
    assert all({"dynamic/frac_dropped", "dynamic/resample_rounds", "dynamic/groups_sampled"} <= r.keys()
               for r in rs)
    resampled = [r for r in rs if r["dynamic/resample_rounds"] > 0]
    assert resampled, "no step needed a second round: the test would prove nothing"
    for r in rs:
        assert r["dynamic/groups_sampled"] == 2 * (1 + r["dynamic/resample_rounds"])
        if r["dynamic/resample_rounds"] < 3:        # enough informative groups found: none tied in the update
            assert r["frac_reward_zero_std"] == 0.0
    assert any(r["dynamic/frac_dropped"] > 0 for r in rs)
    # without dynamic sampling the same data gives tied groups in the update
    run(project, "nodyn", weights={"half_tied": 1.0}, max_steps=4)
    assert any(r["frac_reward_zero_std"] > 0 for r in rows(project, "nodyn"))
    # exact resume: killed after step 2, resumed → same metrics rows and the same final weights
    run(project, "dyn_resumed", stop_after=2, **kw)
    run(project, "dyn_resumed", **kw)
    assert [without_timing(r) for r in rows(project, "dyn_resumed")] == [without_timing(r) for r in rs]
    assert same(weights(project / "out/dyn_resumed/model.safetensors"),
                weights(project / "out/dyn/model.safetensors"))


def test_resample_temperature_changes_only_the_extra_rounds(project):
    """train.resample_temperature: round 0 samples at train.temperature whatever it says; the extra rounds
    sample at it (here near-greedy 0.05 against 1.0), and at train.temperature itself nothing changes."""
    from vlgrpo.train.dynamic import sample_round
    from vlgrpo.train.setup import setup

    def ids(r, **kw):
        cfg = make_cfg(project, weights={"half_tied": 1.0}, dynamic_sampling=True, temperature=1.0, **kw)
        run = setup(cfg, RunPaths.under(project, "data/manifest.jsonl", "models/base", "out/resample_t",
                                        "reports/resample_t.jsonl"))
        return [g.ids for g in sample_round(run, 0, r)]

    def equal(a, b):
        return all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))

    assert equal(ids(0), ids(0, resample_temperature=0.05))                 # round 0: train.temperature
    assert not equal(ids(1), ids(1, resample_temperature=0.05))             # round 1: the resample temperature
    assert equal(ids(1), ids(1, resample_temperature=1.0))


def test_eval_during_training_and_keep_best(project):
    s = run(project, "evald", eval_steps=1, keep_best=True, max_steps=4)
    rs = rows(project, "evald")
    assert all("eval/accuracy" in r and "eval/reward" in r for r in rs)
    assert all(0.0 <= r["eval/accuracy"] <= 1.0 for r in rs)
    rewards = [r["eval/reward"] for r in rs]
    best_step = rewards.index(max(rewards)) + 1                # the first of equal maxima is kept
    assert s["best"]["step"] == best_step and s["best"]["eval/reward"] == max(rewards)
    final = loading.load_model(project / "out/evald")[0]           # the published model folder
    assert params_equal(final, loaded(project, project / f"out/evald/checkpoints/step-{best_step}/model.safetensors"))
    if best_step != 4:                                          # the last policy is not what was kept
        assert not params_equal(final, loaded(project, project / "out/evald/checkpoints/step-4/model.safetensors"))
    # evaluating changes nothing in training: the same steps without evaluation give the same weights
    run(project, "noeval", max_steps=4)
    for k in (1, 4):
        assert same(weights(project / f"out/evald/checkpoints/step-{k}/model.safetensors"),
                    weights(project / f"out/noeval/checkpoints/step-{k}/model.safetensors"))


def test_watch_stops_on_tied_rewards_and_keeps_the_checkpoint_before_them(project):
    cfg = make_cfg(project, {"late_tie": 1.0}, max_steps=8, save_steps=1, save_total_limit=None,
                   watch={"max_kl": None, "collapse_frac": 1.0, "patience": 2, "stop_on": ["reward_collapse"]})
    paths = RunPaths.under(project, "data/manifest.jsonl", "models/base", "out/watched", "reports/watched.jsonl")
    s = train_grpo(cfg, paths, progress=False)
    rs = rows(project, "watched")
    assert [r["frac_reward_zero_std"] == 1.0 for r in rs] == [False, False, True, True]   # stopped at step 4
    stop = s["watch"]["stopped"]
    assert (stop["kind"], stop["first_step"], stop["at_step"]) == ("reward_collapse", 3, 4)
    assert s["watch"]["flags"] == [{k: v for k, v in stop.items() if k != "at_step"}]
    assert s["steps"] == 4 and not s["finished"]
    assert s["watch"]["final_model"].startswith("checkpoint step-2")
    # the published model is the policy of step 2, the last one before the rewards tied
    final = loading.load_model(project / "out/watched")[0]
    assert params_equal(final, loaded(project, project / "out/watched/checkpoints/step-2/model.safetensors"))
    assert not params_equal(final, loaded(project, project / "out/watched/checkpoints/step-4/model.safetensors"))
