"""Tasks of the `pilot` and `train` stages: thin adapters over vlgrpo.train (GRPO) and the pilot's val reward."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from tasks.common import BackgroundLoop, ConsoleProgress
from vlgrpo.config import Config
from vlgrpo.train.paths import RunPaths


# Training is never retried: a retry would silently double the compute and hide the failure.
@task(name="grpo", retries=0, cache_policy=NO_CACHE)
def grpo_task(cfg: Config, paths: RunPaths, artifact_key: str) -> dict[str, Any]:
    """GRPO with ``cfg.train`` (the pilot passes its overrides applied to it) on ``paths``: in this process,
    or on the processes / machines of ``cfg.train.launch`` through accelerate's launcher (tasks/launch.py)."""
    from prefect import get_run_logger

    from vlgrpo.model.precision import describe_precision
    from vlgrpo.train.launch import is_launched

    # what "auto" became here, for this model
    get_run_logger().info(describe_precision(cfg.train.mixed_precision, paths.init_model_dir)[1])
    # The console bar (step, reward, KL, ETA) and the Prefect progress artifact both follow the metrics stream,
    # which the main process writes wherever it runs.
    desc = artifact_key.removesuffix("-progress")
    with ProgressWatcher(paths.metrics_path, cfg.train.max_steps, artifact_key), \
            ConsoleProgress(paths.metrics_path, cfg.train.max_steps, desc):
        if is_launched(cfg.train.launch):
            from tasks.launch import launched_grpo

            return launched_grpo(cfg, paths, desc)
        from vlgrpo.train.loop import train_grpo

        return train_grpo(cfg, paths, progress=False)


@task(name="pilot-val-reward", retries=0, cache_policy=NO_CACHE)
def val_reward_task(cfg: Config, root: Path, manifest: Path, model_dir: Path, max_items: int = 32) -> float:
    """Sampled reward of the pilot policy on held-out val items (sampling as ``cfg.train``, the pilot's
    config; rewards set up as the pilot's training did): the over-fitting check's reference."""
    from vlgrpo.data.manifest import read_manifest
    from vlgrpo.eval.evaluate import mean_sampled_reward, reward_names
    from vlgrpo.model.loading import load_model
    from vlgrpo.rewards import RewardContext, extra_columns, setup_rewards

    items = read_manifest(manifest, split="val")[:max_items]
    rewards = setup_rewards(reward_names(cfg), RewardContext.from_config(cfg, root, manifest.parent,
                                                                         columns=extra_columns(items)))
    model, processor = load_model(model_dir)
    return mean_sampled_reward(model, processor, items, manifest.parent, cfg, rewards=rewards)


class ProgressWatcher(BackgroundLoop):
    """Mirror the trainer's metrics stream into a Prefect progress artifact (percent of steps done).

    The core knows nothing of Prefect; it appends a JSON line per step, and this thread reads the tail.
    """

    name = "progress-artifact"

    def __init__(self, stream: Path, total_steps: int, key: str, interval: float = 3.0):
        self.stream, self.total, self.key, self.interval = Path(stream), total_steps, key, interval
        self._artifact_id = None

    def _step(self) -> int:
        try:
            lines = self.stream.read_text(encoding="utf-8").split("\n")[:-1]
            return int(json.loads(lines[-1]).get("step", 0)) if lines else 0
        except (FileNotFoundError, ValueError, IndexError):
            return 0

    def tick(self) -> None:
        pct = min(100.0, 100.0 * self._step() / max(1, self.total))
        update_progress_artifact(artifact_id=self._artifact_id, progress=pct)

    def __enter__(self) -> "ProgressWatcher":
        self._artifact_id = create_progress_artifact(progress=0.0, key=self.key,
                                                     description=f"GRPO steps done of {self.total}")
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        try:
            self.tick()  # the final percentage, also when training stopped early
        except Exception:  # noqa: BLE001 - a progress display must never mask the stage's own outcome
            pass


def pilot_markdown(decision: dict[str, Any]) -> str:
    lines = [f"# Pilot: {'PASSED' if decision['passed'] else 'FAILED'}", ""]
    lines += [f"- {r}" for r in decision.get("reasons", [])]
    if decision.get("diagnoses"):
        lines += ["", "| problem | evidence | remedy |", "|---|---|---|"]
        lines += [f"| {d['problem']} | {d['evidence']} | {d['remedy']} |" for d in decision["diagnoses"]]
    if decision.get("estimated_full_seconds") is not None:
        lines += ["", f"Throughput {decision.get('throughput', 0):.2f} samples/s; estimated full run "
                      f"{decision['estimated_full_seconds'] / 60:.1f} min."]
    return "\n".join(lines)


def publish_pilot(decision: dict[str, Any]) -> None:
    create_markdown_artifact(markdown=pilot_markdown(decision), key="pilot-diagnosis",
                             description="Pilot gate decision and diagnoses")
