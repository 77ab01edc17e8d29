"""The register stage's MLflow logging is quiet: no warning a user could not act on (type hints, example)."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~25 s: builds, logs and loads a model
def test_log_candidate_warns_nothing_and_the_logged_model_answers(tmp_path):
    import mlflow

    from tasks.registry import log_candidate, serving_example
    from vlgrpo.config import TinyModelConfig
    from vlgrpo.model import loading, tiny_model

    model, proc = tiny_model.build_tiny(["What colour is the image? red green"], TinyModelConfig(), 0)
    loading.save_model(model, proc, tmp_path / "ckpt")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with warnings.catch_warnings(record=True) as caught, mlflow.start_run():
        warnings.simplefilter("always")
        info = log_candidate(REPO, tmp_path / "ckpt", 3136, 12544)
    mlflow_warnings = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "mlflow" in w.filename]
    assert mlflow_warnings == []
    assert [c.name for c in info.signature.inputs.inputs] == ["image", "question", "task"]
    answers = mlflow.pyfunc.load_model(info.model_uri).predict(serving_example(3136))
    assert isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str)
