"""Offline, quiet defaults for the tools, applied before prefect / mlflow / transformers are imported.

The one place these defaults are set. Every entry point imports this first (the `tasks` and `flows`
packages do it in their __init__, the test suite and benchmarks in tests/__init__.py), so a fresh machine
with no hub access and no Prefect server behaves the same under `make`, `dvc repro`, the CLI, a Prefect
worker and pytest; child processes (dvc and its stages) inherit them. Values already in the environment win.
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

for _k, _v in DEFAULTS.items():
    os.environ.setdefault(_k, _v)
