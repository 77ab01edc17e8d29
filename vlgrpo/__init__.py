"""vlgrpo: GRPO-tune Qwen-VL vision-language models. The pure ML core (no prefect, mlflow or dvc)."""

__version__ = "0.1.0"
