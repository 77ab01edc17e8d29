"""The `vlgrpo` command's first-contact behaviour and the stage plumbing it relies on (no servers needed).

- `vlgrpo validate --data FILE` works in a folder with no project (defaults) for every supported format,
  exits 1 on bad rows or a malformed document with one error line and no traceback, and opens no MLflow run;
- an expected failure ends a flow function as a Failed state with its reason; a crash still raises;
- a run's owner process is recognised as dead (exited, or its pid reused) or alive;
- the train stage's console progress bar reads step, reward and KL from the metrics stream;
- the pilot's diagnoses print as a table;
- `vlgrpo where` names both UIs and how to open them.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from flows.pilot import diagnosis_table
from tasks.common import ConsoleProgress, StageFailed, expected_failures
from tasks.tracking import HOST_TAG, PID_STARTED_TAG, PID_TAG, owner_alive, owner_tags
from tests.fixtures_data import make_coco, make_flickr, save_image, swift_row, write_jsonl
from tests.project import BIN, project_env


def _swift(folder: Path, bad_rows: int = 0) -> Path:
    for i in range(3):
        save_image(folder / "images" / f"{i}.png", seed=i)
    rows = [swift_row(f"images/{i}.png", solution=str(i)) for i in range(3)]
    rows += [swift_row("images/missing.png")] * bad_rows + ["{not json"] * bad_rows
    return write_jsonl(folder / "train.jsonl", rows)


@pytest.fixture
def nowhere(tmp_path, monkeypatch) -> Path:
    """An empty working folder: no params.yaml, no project."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.mark.parametrize("fmt", ["jsonl", "coco", "flickr30k"])
def test_validate_anywhere_with_the_defaults(nowhere, tmp_path, capsys, fmt):
    data = tmp_path / "data"
    path = {"jsonl": lambda: _swift(data),
            "coco": lambda: make_coco(data, [(1, "1.jpg", ["A cat."]), (2, "2.jpg", ["A dog."])]),
            "flickr30k": lambda: make_flickr(data, [(0, "a.jpg", "train", ["A cat."]),
                                                    (1, "b.jpg", "test", ["A dog."])])}[fmt]()
    assert main(["validate", "--data", str(path)]) == 0
    err = capsys.readouterr().err
    assert "validate OK" in err and "the defaults (no params.yaml here)" in err
    report = json.loads((nowhere / f"{path.name}.validation.json").read_text())
    assert report["ok"] is True and report["rows"] == 2 + (fmt == "jsonl")
    assert not (nowhere / "mlflow.db").exists() and not (nowhere / "reports").exists()


def test_validate_bad_rows_and_malformed_document_one_line_no_traceback(nowhere, tmp_path, capsys):
    bad = _swift(tmp_path / "bad", bad_rows=2)
    assert main(["validate", "--data", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "missing_image" in err and "invalid_json" in err
    report = json.loads((nowhere / "train.jsonl.validation.json").read_text())
    assert report["ok"] is False and report["rows"] == 7 and report["error_rows"] >= 2
    assert err.count(f"vlgrpo validate: error: {bad} is not valid: {report['error_rows']} of 7 rows "
                     "with errors") == 1
    assert "Traceback" not in err

    broken = tmp_path / "captions.json"
    broken.write_text('{"images": [')  # a COCO document cut short: one unreadable record
    assert main(["validate", "--data", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count(f"vlgrpo validate: error: {broken} is not valid") == 1

    missing = tmp_path / "nowhere.jsonl"  # no such file: reported, never a traceback
    assert main(["validate", "--data", str(missing)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count(f"vlgrpo validate: error: {missing}") == 1

    (nowhere / "params.yaml").write_text("validate: {max_error_fraction: [\n")  # a config problem
    assert main(["validate", "--data", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vlgrpo validate: error: params.yaml: not valid YAML") and err.count("\n") == 1


def test_validate_inside_a_project_uses_its_params_and_opens_no_mlflow_run(nowhere, tmp_path, capsys):
    good = _swift(tmp_path / "good")
    (nowhere / "params.yaml").write_text("train: {max_prompt_tokens: 4}\n")  # every prompt too long
    assert main(["validate", "--data", str(good)]) == 1
    err = capsys.readouterr().err
    assert "prompt_too_long=3" in err and "checked with params.yaml" in err
    assert not (nowhere / "mlflow.db").exists() and not (nowhere / "mlartifacts").exists()


@pytest.mark.slow
def test_validate_command_from_an_empty_folder(nowhere, tmp_path):
    """The acceptance check as a user runs it: `cd "$(mktemp -d)" && vlgrpo validate --data <file>`."""
    bad = _swift(tmp_path / "bad", bad_rows=1)
    p = subprocess.run([str(BIN / "vlgrpo"), "validate", "--data", str(bad)], cwd=nowhere,
                       env=project_env(nowhere), capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert p.stderr.count("vlgrpo validate: error:") == 1 and "of 5 rows with errors" in p.stderr


def test_expected_failure_is_a_failed_state_and_a_crash_still_raises():
    from prefect.states import State

    @expected_failures
    def refuses(x: int) -> int:
        raise StageFailed(f"gate did not pass at {x}")

    @expected_failures
    def crashes() -> None:
        raise ZeroDivisionError("a real bug")

    state = refuses(3)
    assert isinstance(state, State) and state.is_failed() and state.message == "gate did not pass at 3"
    with pytest.raises(ZeroDivisionError):
        crashes()
    assert expected_failures(lambda: 7)() == 7


def test_owner_alive_for_live_exited_reused_and_foreign_processes():
    me = owner_tags()
    assert me[HOST_TAG] == socket.gethostname() and me[PID_TAG] == str(os.getpid())
    assert owner_alive(me)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # exited and reaped: its pid names no process (or, if reused, one started later)
    assert not owner_alive({**me, PID_TAG: str(gone.pid), PID_STARTED_TAG: "1.00"})
    assert not owner_alive({**me, PID_STARTED_TAG: "1.00"})  # same pid, other start time: a reused pid
    assert owner_alive({**me, HOST_TAG: "another-host", PID_TAG: str(gone.pid)})  # never judged from here
    assert owner_alive({"mlflow.runName": "no owner tags"})


def test_console_progress_shows_step_reward_kl_and_eta(tmp_path, capsys):
    stream = tmp_path / "metrics.jsonl"
    with ConsoleProgress(stream, total_steps=4, desc="train", interval=60) as bar:
        stream.write_text("".join(json.dumps({"step": s, "reward": s / 10, "kl": s / 100}) + "\n"
                                  for s in (3, 4)) + '{"step": 5, "rew')  # resumed at 3; a partial tail
        bar.tick()
        assert bar._bar.n == 4 and bar._bar.initial == 2
    err = capsys.readouterr().err
    assert "step 4/4" in err and "reward 0.400, kl 0.040" in err
    assert "<" in err  # elapsed<remaining: the ETA


def test_diagnosis_table_lists_each_problem():
    table = diagnosis_table([{"problem": "unstable", "evidence": "max KL 2.1 > 0.5", "remedy": "x0.5 lr"},
                             {"problem": "overfitting", "evidence": "val " + "y" * 200, "remedy": "augment"}])
    lines = table.splitlines()
    assert lines[0].split() == ["problem", "evidence", "remedy"] and set(lines[1].strip()) <= {"-", " "}
    assert lines[2].split()[:2] == ["unstable", "max"] and lines[3].split()[0] == "overfitting"
    assert "..." in lines[3] and len(lines[3]) < 160


def test_refused_promotion_is_one_line_and_exit_1(nowhere, capsys):
    (nowhere / "params.yaml").write_text("register: {model_name: vlgrpo-cli-test}\n")
    assert main(["promote", "--version", "7", "--reason", "looks good"]) == 1
    err = capsys.readouterr().err
    # MLflow may log its own start-up lines first (only on the first use in a process): the reason is the last line.
    assert err.splitlines()[-1] == ("vlgrpo promote: error: refusing to promote vlgrpo-cli-test version 7: no such "
                                    "registered version") and "Traceback" not in err


def test_where_names_both_uis_and_how_to_open_them(nowhere, capsys, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        monkeypatch.delenv(var, raising=False)
    (nowhere / "params.yaml").write_text("{}\n")
    assert main(["where"]) == 0
    out = capsys.readouterr().out
    assert f"mlflow ui --backend-store-uri sqlite:///{nowhere.resolve() / 'mlflow.db'}" in out
    assert "Prefect UI" in out and "prefect server start" in out and "http://127.0.0.1:4200" in out
    # With servers configured, their addresses.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.internal:4200/api")
    assert main(["where"]) == 0
    out = capsys.readouterr().out
    assert "MLflow UI          http://mlflow.internal:5000" in out
    assert "Prefect UI         http://prefect.internal:4200 " in out
