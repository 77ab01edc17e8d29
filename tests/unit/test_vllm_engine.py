"""train.rollout.engine vllm: a real vLLM engine (its own environment, .venv-vllm from `make vllm-env`) generates
a short GRPO run's rollouts on the tiny model; after a weight push its greedy output equals the trainer's; a
killed engine fails the run with one clear line, leaves no process behind, and the rerun resumes."""
import os
import signal
import textwrap
from pathlib import Path

import pytest
import torch

from tests.tiny_setup import tiny_project, tiny_train_cfg
from vlgrpo.config import VllmConfig
from vlgrpo.data.manifest import read_manifest
from vlgrpo.model import decoding, loading, prompt_encoding
from vlgrpo.train.engine import EngineError, VllmEngine, to_completions
from vlgrpo.train.loop import train, train_grpo
from vlgrpo.train.paths import RunPaths
from vlgrpo.train.sampling import SamplingSpec
from vlgrpo.train.setup import setup

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv-vllm/bin/python"
PLUGIN = textwrap.dedent('''
    from vlgrpo.rewards import register

    @register("text_length")
    def text_length(prompts, completions, **columns):
        return [min(len(c), 20) / 20.0 for c in completions]
''')
PIXELS = (3136, 200704)


def vllm_cfg(**kw) -> dict:
    return {"engine": "vllm", "vllm": {"python": str(PYTHON), "dtype": "float32", "max_model_len": 512, **kw}}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    if not PYTHON.exists():
        pytest.fail(f"the vLLM engine environment is missing ({PYTHON}): build it with `make vllm-env` "
                    f"(`make test` does)")
    root = tmp_path_factory.mktemp("proj")
    return tiny_project(root, tiny_train_cfg(root, {"text_length": 1.0}), PLUGIN)


@pytest.fixture(scope="module")
def engine(project):
    eng = VllmEngine.start(VllmConfig(**vllm_cfg()["vllm"]), project / "models/base", project, 0)
    yield eng
    eng.close()


def paths(project, name):
    return RunPaths.under(project, "data/manifest.jsonl", "models/base", f"out/{name}", f"reports/{name}.jsonl")


def greedy_pair(engine, project, model, processor):
    """(engine greedy completions, trainer greedy completions, engine prompt ids, trainer prompt ids)."""
    items = read_manifest(project / "data/manifest.jsonl")[:4]
    rendered = prompt_encoding.render_prompts(processor, items, project / "data", *PIXELS)
    enc = prompt_encoding.encode_rendered(processor, rendered, *PIXELS)
    spec = SamplingSpec(1, 6, 1e-6, 1.0, tuple(decoding.stop_token_ids(processor, model)),
                        processor.tokenizer.pad_token_id, tuple(decoding.vision_token_ids(processor, model)))
    outs = engine.generate([r[0] for r in rendered], [r[1] for r in rendered], spec, 0, PIXELS)
    comps, _ = to_completions(outs, spec)
    eng = [ids[:int(m.sum())] for ids, m in zip(comps.ids.tolist(), comps.mask)]
    with torch.no_grad():
        full = model.generate(**enc, max_new_tokens=6, do_sample=False)
    L = enc["input_ids"].shape[1]
    stops = set(spec.stop_ids)
    hf = []
    for row in full[:, L:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        hf.append(row[:cut])
    ours = [enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist() for i in range(len(items))]
    return eng, hf, [o["prompt_token_ids"] for o in outs], ours


def test_engine_sees_the_trainers_prompts_and_greedy_matches_after_push(engine, project):
    model, processor = loading.load_model(project / "models/base")
    model.eval()
    e0, h0, eng_prompts, our_prompts = greedy_pair(engine, project, model, processor)
    assert eng_prompts == our_prompts               # per prompt: same ids, image tokens expanded once
    assert e0 == h0
    torch.manual_seed(0)
    with torch.no_grad():                           # a policy far from the engine's weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    e_stale, h1, _, _ = greedy_pair(engine, project, model, processor)
    assert e_stale != h1                            # the engine still holds the old weights
    engine.push_weights(model)
    e1, h1, _, _ = greedy_pair(engine, project, model, processor)
    assert e1 == h1


def test_grpo_run_on_the_engine_syncs_every_step(engine, project):
    # temperature 0.7 (not 1.0): the engine's log-probs must be those after temperature, as the trainer's are
    raw = tiny_train_cfg(project, {"text_length": 1.0}, max_steps=2, temperature=0.7,
                         rollout=vllm_cfg(url=engine.url))
    summary = train_grpo(raw, paths(project, "run"), progress=False)
    assert summary["finished"]
    assert engine.proc is not None and engine.proc.poll() is None      # a connect-ed server is left running
    import json
    rows = [json.loads(ln) for ln in (project / "reports/run.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:                                  # pushed before each rollout, mismatch logged each step
        assert r["time/sync_s"] > 0 and r["time/sync_push_s"] > 0
        # fp32 on both sides, the same weights and the same sampling distribution (vision ids banned, at the
        # rollout temperature): the log-probs agree to float rounding. Scored without the ban, the trainer's
        # were lower by the banned mass on every token (|log ratio| 0.013-0.02 here, IS weights all < 1).
        assert 0 <= r["mismatch/logp_diff_mean"] < 1e-3, r
        assert abs(r["mismatch/is_weight_mean"] - 1.0) < 1e-3, r
    # after a push of the trained policy the engine decodes greedily what the trainer does
    model, processor = loading.load_model(project / "out/run")
    model.eval()
    engine.push_weights(model)
    e, h, _, _ = greedy_pair(engine, project, model, processor)
    assert e == h


def test_missing_engine_environment_is_one_clear_line(project):
    cfg = tiny_train_cfg(project, {"text_length": 1.0}, rollout=vllm_cfg(python="no-such/bin/python"))
    with pytest.raises(EngineError, match=r"no-such/bin/python does not exist.*make vllm-env"):
        train_grpo(cfg, paths(project, "missing"), progress=False)


def test_killed_engine_fails_cleanly_and_the_rerun_resumes(engine, project):
    cfg = tiny_train_cfg(project, {"text_length": 1.0}, max_steps=3, rollout=vllm_cfg())
    run = setup(cfg, paths(project, "killed"))
    pid = run.engine.pid
    real = run.rollout_fn

    def kill_at_step_two(r, step, clock):         # the engine dies after one finished, checkpointed step
        if step == 1:
            os.killpg(pid, signal.SIGKILL)
        return real(r, step, clock)

    run.rollout_fn = kill_at_step_two
    with pytest.raises(EngineError, match=r"vllm rollout engine \(http://127\.0\.0\.1:\d+.*\) died"):
        train(run, progress=False)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)                           # no orphan server
    assert (project / "out/killed/checkpoints/step-1").is_dir()
    # The rerun goes to the module's running engine by URL: where the engine runs is not part of what a
    # checkpoint must share, so the run resumes; an engine given by URL is left running.
    cfg2 = tiny_train_cfg(project, {"text_length": 1.0}, max_steps=3, rollout=vllm_cfg(url=engine.url))
    run2 = setup(cfg2, paths(project, "killed"))
    assert run2.start_step == 1                     # resumes from the checkpoint the dead engine left
    summary = train(run2, progress=False)
    assert summary["finished"]
    os.killpg(engine.pid, 0)                        # still running: not stopped by a run that connected to it
