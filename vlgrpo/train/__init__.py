"""GRPO training on ``accelerate``, with the work shared across each group of G completions.

Run (the ``train`` / ``pilot`` stages call this; it needs ``data/manifest.jsonl`` and ``models/base``):

    from vlgrpo.config import load_config
    from vlgrpo.train.loop import train_grpo
    from vlgrpo.train.paths import RunPaths
    cfg = load_config("params.yaml")
    train_grpo(cfg, RunPaths.under(".", "data/manifest.jsonl", "models/base", "models/candidate",
                                   "reports/train_metrics.jsonl"))

    # two CPU processes (gloo):
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m vlgrpo.train params.yaml

The loop (``loop.train_grpo``) reads like this, one module per part; the types passed between them (Run,
Rollout, Completions, UpdateResult, StepClock) live in state.py, which imports none of these modules:

    run = setup(cfg, paths)                        # setup.py: model(s), optimizer, prompts, rewards, resume,
                                                   #   the rollout strategy (run.rollout_fn)
    for step in range(run.start_step, max_steps):
        ro = run.rollout_fn(run, step, clock)      # rollout.py: prompts -> G completions (generation.py)
                                                   #   -> rewards -> group advantages -> old/ref log-probs
                                                   #   (dynamic.py: resample tied groups, dynamic_sampling)
        upd = update(run, ro.batch, step)          # update.py: loss over micro-batches (scoring.py) -> AdamW
                                                   #   (-> reference sync, sync_ref_model)
        row = metrics_row(run, step, ro, upd, clock)   # metrics.py: one JSON line per step
        periodic_eval.after_step(run, step, row)   # periodic_eval.py: eval_steps on val, keep_best
        save_step(run, step)                       # checkpoint.py: atomic step-N checkpoints, exact resume

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
- aggregation normalisers are counted over the whole step (see vlgrpo.algo.grpo), so accumulation does not
  change the maths.
"""
