"""Offline, quiet defaults for the tools (hub, telemetry, Prefect start-up): the one place they are set.

Applied before prefect / mlflow / transformers / great_expectations are imported: by ``tasks/_env.py``
(imported first by the `tasks` and `flows` packages, the test suite and the benchmarks) and by the core's own
lazy imports of such a tool (``vlgrpo.data.validation``), so a fresh machine with no hub access and no Prefect
server behaves the same under `make`, `dvc repro`, the CLI, a Prefect worker, pytest and a library call.
Child processes (dvc and its stages) inherit them. Values already in the environment win. The docker image
sets the same values for the processes that never import this package (`prefect server`, `mlflow server`);
``tests/unit/test_docker_compose.py`` keeps the two equal.
"""
import os

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The temporary server needs ~10-12 s to start on 2 cores; Prefect's default limit is too tight there.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "INFO",
    "GX_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "true",
    "GIT_PYTHON_REFRESH": "quiet",
}


# CPU threads that share the machine. PyTorch's OpenMP threads spin-wait between parallel regions by default;
# with a second CPU job beside a run (another run, the test suite's second worker, a laptop's browser) the
# spinning threads of both fight over the cores and a 1.5 s training step took 16 s. Passive waiting puts
# idle threads to sleep. Override: OMP_WAIT_POLICY=ACTIVE (a dedicated machine), OMP_NUM_THREADS=N.
THREAD_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply() -> None:
    """Set every default that the environment does not already set (before torch loads OpenMP)."""
    for key, value in {**DEFAULTS, **THREAD_DEFAULTS}.items():
        os.environ.setdefault(key, value)
