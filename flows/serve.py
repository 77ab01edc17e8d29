"""Serve the scheduled `pipeline` deployment from this process (`flow.serve`; no work pool needed).

Run: `vlgrpo serve [--cron "0 3 * * *"]` or `python -m flows.serve`, with PREFECT_API_URL pointing at a
running `prefect server start` (the temporary server of a one-off run cannot take scheduled runs).
The schedule and parameters default to those of the `scheduled` deployment in prefect.yaml.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from flows.pipeline import pipeline_flow

ROOT = Path(__file__).resolve().parent.parent


def deployment_spec(name: str = "scheduled") -> dict:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for d in spec.get("deployments", []):
        if d["name"] == name:
            return d
    raise KeyError(f"prefect.yaml has no deployment named {name!r}")


def serve(params: str = "params.yaml", name: str = "scheduled", cron: str | None = None) -> None:
    if not os.environ.get("PREFECT_API_URL"):
        raise SystemExit("vlgrpo serve needs PREFECT_API_URL (e.g. start `prefect server start` and set "
                         "PREFECT_API_URL=http://127.0.0.1:4200/api)")
    spec = deployment_spec(name)
    cron = cron or spec["schedules"][0]["cron"]
    parameters = {**spec.get("parameters", {}), "params": params}
    pipeline_flow.serve(name=name, cron=cron, parameters=parameters)


if __name__ == "__main__":
    serve()
