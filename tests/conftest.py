"""Suite-wide set-up for running the tests two at a time (`make test`: pytest-xdist, ``-n 2 --dist loadgroup``).

Much of the suite's wall time is spent waiting - for servers to start, for retries across a restarted server,
for a slowed training step - with a core idle; two workers keep both busy. On the 2-core machine the suite
took 52 minutes one file after another and 12 with two workers of one OpenMP thread each (README, "Tests";
how much of that each of the two changes gives was not measured apart). What makes it safe:

- **One unit of work per test file** (an ``xdist_group`` named after the module): a module's fixtures (a
  trained project, a server) are built once, by one worker, as in a serial run. The files that compare with
  the one undisturbed `vlgrpo repro` of the session share a group, so that repro runs once.
- **One OpenMP thread per worker.** PyTorch's OpenMP threads busy-wait for each other; two workers with two
  threads each on two cores slow every tensor op several-fold (docs/benchmarks.md, "Findings"). Child
  processes (the stage commands, ``accelerate launch``) inherit it.
- **A Prefect home per worker**: a flow run without ``PREFECT_API_URL`` starts a temporary server on the
  SQLite database under ``PREFECT_HOME``; two of them on one file would lock each other out.

A plain ``pytest`` (no ``-n``) runs serially with the machine's defaults, as before.

Every test also starts and ends with the MLflow store variables as the session had them
(``_no_mlflow_store_leaks``): ``mlflow.set_tracking_uri`` exports its URI to ``MLFLOW_TRACKING_URI``, so a
test restoring MLflow's previous URI that way leaves a store of an earlier test - whose folder pytest has
deleted once it passed - as the "user's choice" of every later test in the process.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:   # before anything imports torch or prefect
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _PREFECT_HOME = tempfile.mkdtemp(prefix=f"vlgrpo-tests-prefect-{WORKER}-")
    os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)

# modules that share a session fixture worth building once (tests/reliability/conftest.py:undisturbed_repro)
SHARED_GROUPS = {
    "tests.reliability.test_kill_every_stage": "undisturbed-repro",
    "tests.reliability.test_disk_full": "undisturbed-repro",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__ if item.module is not None else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(SHARED_GROUPS.get(module, module)))


MLFLOW_STORE_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def _no_mlflow_store_leaks():
    saved = {k: os.environ.get(k) for k in MLFLOW_STORE_VARS}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item (``item.rep_call``...), for fixtures that act on a failure
    (the browser tests keep a screenshot of the page)."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def pytest_sessionfinish(session, exitstatus):
    if WORKER:
        shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


@pytest.fixture
def restore_registry():
    """The reward registry as it was before the test: plugin files a test loads register into it."""
    from vlgrpo.rewards.registry import REWARDS

    saved = dict(REWARDS)
    yield
    REWARDS.clear()
    REWARDS.update(saved)
