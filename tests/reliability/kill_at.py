"""Run the `vlgrpo` command, but SIGKILL the process at an exact point: the Nth call of a function.

    python -m tests.reliability.kill_at MODULE:ATTR:N  vlgrpo-args...

e.g. ``mlflow.tracking:MlflowClient.set_registered_model_alias:1 register`` dies just before the first alias
is set, i.e. after the model version was created. The kill is a real SIGKILL of the real stage process (no
finally block, atexit handler or Prefect state hook runs); only *where* it lands is chosen, which a timer
from outside cannot do for a window of milliseconds.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys


def install(spec: str) -> None:
    module, attr, n = spec.split(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(n):
            sys.stderr.write(f"kill_at: SIGKILL at call {n} of {module}:{attr}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    install(sys.argv[1])
    from flows.cli import main

    sys.exit(main(sys.argv[2:]))
