"""The MLflow model registry: register the candidate, move aliases, load the champion.

Promotion is by alias (stages are deprecated): every registered version gets alias ``candidate``; alias
``champion`` moves only when ``gates.should_promote()`` said so, or by hand with ``vlgrpo promote``. Each
move is recorded as version tags (reason, who, when, previous champion). The alias is set only after the
version reports READY, so it never points at a half-registered version.

Registration is idempotent: each version is created with tag ``vlgrpo.candidate_sha256`` (a hash of the
candidate's files) in the same call, so a stage killed between creating the version and setting its aliases
or tags finds that version on the next run and finishes it, instead of registering the candidate twice.

A version is what MLflow 3 shows as a registered model: it is created from the logged model
(``models:/m-<id>``, with its signature and input example) and the logged model records the version
(its ``mlflow.modelVersions`` tag, as ``mlflow.register_model`` writes it), so the model's page lists it.
Its source run is the ``train`` run that produced the weights (the train run lists the logged model among
its outputs); the ``register`` run that logged the files is tagged on the version. The version carries a
description (what was trained, how it evaluated, the decision) and the evaluation's test metrics, as
metrics of the logged model and as version tags. Every one of these steps is re-done, once, by a re-run
that finds the version of a killed one.
"""
from __future__ import annotations

import dataclasses
import getpass
import hashlib
import json
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.tracking import retry
from vlgrpo.config import REQUEST_BATCH_SIZE, REQUEST_MAX_NEW_TOKENS, ServingConfig
from vlgrpo.io import HASHES_FILE, disk_full, is_disk_full, sha256_file, tree_size

CHAMPION, CANDIDATE = "champion", "candidate"
FINGERPRINT_TAG = "vlgrpo.candidate_sha256"

# What loading and calling the logged pyfunc model imports (tasks/pyfunc_model.py -> vlgrpo.model.modeling, lora,
# data.manifest); vlgrpo's own code travels with the model (code_paths), so vlgrpo is not on the list.
# Given explicitly because MLflow would otherwise infer the list by loading the model in a subprocess: ~9 s
# a registration on 2 idle cores, and under load its 120 s limit runs out and it falls back to cloudpickle
# alone. The versions are the installed ones (requirements.lock).
SERVING_REQUIREMENTS = ("mlflow", "cloudpickle", "torch", "torchvision", "transformers", "accelerate",
                        "tokenizers", "safetensors", "qwen-vl-utils", "peft", "pillow", "numpy", "pandas",
                        "pyyaml", "tqdm")


def pip_requirements() -> list[str]:
    """``name==version`` for each serving requirement installed here (a local build label like +cpu dropped:
    pip resolves the public version)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in SERVING_REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:  # e.g. peft where LoRA is not installed: the model does not need it
            continue
    return pins


def serving_model_config(root: Path, min_pixels: int, max_pixels: int,
                         serving: ServingConfig | None = None) -> dict[str, Any]:
    """What the served model reads at load time (tasks/pyfunc_model.py Limits): the pixel budget it was
    trained with and the ``register.serving`` caps on a request (the image folder as an absolute path)."""
    serving = serving or ServingConfig()
    out = {"min_pixels": min_pixels, "max_pixels": max_pixels, **dataclasses.asdict(serving)}
    if serving.image_folder is not None:
        out["image_folder"] = str((Path(root) / serving.image_folder).resolve())
    return out


def _log_model(root: Path, checkpoint: Path, min_pixels: int, max_pixels: int,
               serving: ServingConfig | None = None) -> Any:
    """The pyfunc model of ``checkpoint`` logged to the active run, with its signature and an example."""
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(root / "tasks" / "pyfunc_model.py"),
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(root / "vlgrpo")],
        model_config=serving_model_config(root, min_pixels, max_pixels, serving),
        pip_requirements=pip_requirements(),
        # What a request holds and returns; MLflow also answers the example once as a smoke test.
        signature=serving_signature(serving), input_example=serving_example(min_pixels),
    )


def serving_signature(serving: ServingConfig | None = None) -> Any:
    """The served model's signature: rows of ``image`` (base64 image bytes), ``question``, optional ``task``;
    params ``batch_size`` and ``max_new_tokens`` (without a params schema MLflow would drop them)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    serving = serving or ServingConfig()
    inputs = Schema([ColSpec("string", "image"), ColSpec("string", "question"),
                     ColSpec("string", "task", required=False)])
    params = ParamSchema([ParamSpec("batch_size", "long", min(REQUEST_BATCH_SIZE, serving.max_batch_size)),
                          ParamSpec("max_new_tokens", "long",
                                    min(REQUEST_MAX_NEW_TOKENS, serving.max_new_tokens))])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string")]), params=params)


def serving_example(min_pixels: int) -> Any:
    """One request row: a plain grey PNG of the smallest size the model takes, and a question."""
    import base64
    import io

    import pandas as pd
    from PIL import Image

    side = max(28, int(min_pixels ** 0.5))
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (128, 128, 128)).save(buf, format="PNG")
    return pd.DataFrame([{"image": base64.b64encode(buf.getvalue()).decode("ascii"),
                          "question": "What colour is the image?"}])


def champion_version(client: MlflowClient, name: str) -> str | None:
    try:
        # str(): the SQL store answers ints, the REST client strings; versions are compared across both.
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:  # no such model or no such alias: there is no champion yet
        return None


def champion_loader(name: str) -> Callable[[], Any] | None:
    """A loader for the current champion's HF checkpoint (None when there is none); the core calls it."""
    client = MlflowClient()
    version = retry(lambda: champion_version(client, name), what="read champion alias")
    if version is None:
        return None

    def load():
        # Through pyfunc, exactly as a user loading models:/<name>@champion gets it; the wrapper holds the
        # Hugging Face model and processor it loaded from the logged checkpoint.
        wrapper = mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model()
        return wrapper.model, wrapper.processor

    load.version = version  # type: ignore[attr-defined]
    return load


def log_candidate(root: Path, checkpoint: Path, min_pixels: int, max_pixels: int,
                  merge_lora: bool = False, serving: ServingConfig | None = None) -> Any:
    """Log the checkpoint as a pyfunc model in the active run; returns MLflow's ModelInfo.

    A LoRA candidate (a peft adapter directory) is logged as it is - the adapter, megabytes, which names its
    base model (``models/base`` or a hub id) and needs it where the model is loaded - or, with
    ``merge_lora``, as the base with the adapter merged in (a self-contained checkpoint).

    A full artifact store (a local one: ``mlartifacts/`` beside ``mlflow.db``) raises ``DiskFull`` naming
    its folder and the model's size, and is not retried; no model version exists yet at that point.
    """
    import tempfile

    from vlgrpo.model import loading

    root = Path(root)

    def upload(checkpoint: Path) -> Any:
        try:
            with warnings.catch_warnings():
                # MLflow's own pandas call when it saves the input example (`df.columns == range(...)`) is
                # deprecated in pandas; nothing the user can change. Only that one message is hidden.
                warnings.filterwarnings("ignore", message="Operation with range is deprecated", module="mlflow")
                return _log_model(root, checkpoint, min_pixels, max_pixels, serving)
        except Exception as e:  # noqa: BLE001 - MLflow wraps OS errors in several types
            if not is_disk_full(e):
                raise
            store = Path(urlparse(mlflow.get_artifact_uri()).path)
            raise disk_full(store / "model", tree_size(checkpoint) + tree_size(root / "vlgrpo"), "about") from e

    with tempfile.TemporaryDirectory(prefix="vlgrpo-merged-") as tmp:
        if loading.is_adapter_dir(checkpoint) and merge_lora:
            checkpoint = loading.save_merged(checkpoint, Path(tmp) / "merged")
        return retry(lambda: upload(checkpoint), what="log pyfunc model")


def candidate_fingerprint(checkpoint: Path) -> str:
    """sha256 over the names and contents of the model folder's top-level files (weights, config, processor).

    Training checkpoints (a sub-folder) and the hashes file are left out: they do not change what is served.
    """
    h = hashlib.sha256()
    for p in sorted(Path(checkpoint).iterdir()):
        if p.is_file() and p.name != HASHES_FILE:
            h.update(f"{p.name}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def find_version(client: MlflowClient, name: str, fingerprint: str) -> Any | None:
    """The version registered earlier for this exact candidate (e.g. by a run killed half-way), if any."""
    found = retry(lambda: client.search_model_versions(
        f"name = '{name}' and tags.`{FINGERPRINT_TAG}` = '{fingerprint}'"), what="search model versions")
    live = [mv for mv in found if mv.status != "FAILED_REGISTRATION"]
    return min(live, key=lambda mv: int(mv.version)) if live else None


REGISTER_RUN_TAG, TRAIN_RUN_TAG = "vlgrpo.register_run_id", "vlgrpo.train_run_id"


def register_candidate(client: MlflowClient, name: str, root: Path, checkpoint: Path, run_id: str,
                       tags: dict[str, str], pixels: tuple[int, int], merge_lora: bool = False, *,
                       source_run_id: str | None = None, description: str | None = None,
                       metrics: dict[str, float] | None = None,
                       serving: ServingConfig | None = None) -> tuple[str, bool]:
    """Register the candidate once: re-use the version an earlier (interrupted) run created for the same
    files, or log the pyfunc model (in the active run, ``run_id``) and create one. Returns (version, re_used).

    ``source_run_id``: the run that trained the weights (the version's source run; default ``run_id``).
    ``description`` and ``metrics`` (evaluation results) go on the version and its logged model."""
    fingerprint = candidate_fingerprint(checkpoint)
    existing = find_version(client, name, fingerprint)
    source = source_run_id or run_id
    tags = {**tags, REGISTER_RUN_TAG: run_id, TRAIN_RUN_TAG: source}
    if existing is None:
        info = log_candidate(root, checkpoint, *pixels, merge_lora=merge_lora, serving=serving)
        version = register_version(client, name, info, source, {**tags, FINGERPRINT_TAG: fingerprint})
        model_id, reused = info.model_id, False
    else:
        version, model_id, reused = str(existing.version), model_id_of(existing), True
        _wait_ready(client, name, existing)
        # Finish what the interrupted run may not have done: its tags and the candidate alias.
        for k, v in tags.items():
            retry(lambda k=k, v=v: client.set_model_version_tag(name, version, k, v), what="tag version")
        link_logged_model(client, model_id, name, version)
        retry(lambda: client.set_registered_model_alias(name, CANDIDATE, version), what="set candidate alias")
    describe_version(client, name, version, model_id, run_id, source, description, metrics or {})
    return version, reused


def model_id_of(mv: Any) -> str | None:
    """The logged model's id of a version: its ``model_id`` where the registry keeps it, else read from its
    source ``models:/m-<id>`` (MLflow's SQL registry stores the source, not the id)."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = str(getattr(mv, "source", "") or "")
    rest = source[len("models:/"):] if source.startswith("models:/") else ""
    return rest.split("/")[0] if rest.startswith("m-") else None


def link_logged_model(client: MlflowClient, model_id: str | None, name: str, version: str) -> None:
    """Record ``name``/``version`` on its logged model (tag ``mlflow.modelVersions``, the list MLflow's
    ``register_model`` keeps), once: the model's page then shows it registered."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    if not model_id:
        return
    model = retry(lambda: client.get_logged_model(model_id), what="read logged model")
    linked = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    if any(str(v.get("name")) == name and str(v.get("version")) == str(version) for v in linked):
        return
    value = json.dumps(linked + [{"name": name, "version": str(version)}])
    retry(lambda: client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: value}), what="link logged model")


def describe_version(client: MlflowClient, name: str, version: str, model_id: str | None, register_run: str,
                     train_run: str, description: str | None, metrics: dict[str, float]) -> None:
    """The version's description, the evaluation metrics on its logged model (each once) and the link
    from the train run to the logged model (its outputs)."""
    from mlflow.entities import LoggedModelOutput, Metric

    if description:
        retry(lambda: client.update_model_version(name, version, description=description),
              what="describe version")
    if not model_id:
        return
    model = retry(lambda: client.get_logged_model(model_id), what="read logged model")
    have = {m.key for m in (model.metrics or [])}
    now = int(time.time() * 1000)
    new = [Metric(k, float(v), now, 0, model_id=model_id) for k, v in metrics.items() if k not in have]
    if new:   # logged through the run that logged the model: MLflow keeps a logged model's metrics by run
        retry(lambda: client.log_batch(register_run, metrics=new), what="log model metrics")
    # mlflow.note.content: the description MLflow's UI shows on the logged model's page too.
    notes = {"mlflow.note.content": description} if description else {}
    retry(lambda: client.set_logged_model_tags(model_id, {TRAIN_RUN_TAG: train_run, REGISTER_RUN_TAG: register_run,
                                                          **notes}), what="tag logged model")
    if train_run != register_run:
        try:
            outputs = retry(lambda: client.get_run(train_run), what="read train run").outputs
        except RuntimeError as e:  # the train run is gone (deleted, another store): the tags still name it
            log_warning(f"train run {train_run} not found; the logged model is not listed on it: {e}")
            return
        if model_id not in {o.model_id for o in (outputs.model_outputs if outputs else [])}:
            retry(lambda: client.log_outputs(train_run, [LoggedModelOutput(model_id, 0)]),
                  what="link train run to the logged model")


def log_warning(message: str) -> None:
    import logging

    logging.getLogger("vlgrpo.registry").warning(message)


def _wait_ready(client: MlflowClient, name: str, mv: Any, timeout_s: float = 300) -> Any:
    deadline = time.monotonic() + timeout_s
    while mv.status != "READY":
        if mv.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise RuntimeError(f"model version {name}/{mv.version} did not become READY ({mv.status})")
        time.sleep(0.5)
        mv = retry(lambda: client.get_model_version(name, mv.version), what="poll model version")
    return mv


def register_version(client: MlflowClient, name: str, model_info: Any, run_id: str,
                     tags: dict[str, str], timeout_s: float = 300) -> str:
    """Create the registered model version, wait until READY, then alias it ``candidate``."""
    try:
        retry(lambda: client.create_registered_model(name), what="create registered model", attempts=1)
    except RuntimeError as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e) and "already exists" not in str(e):
            raise
    # MLflow 3 logged models live at models:/m-<id>; the registry needs that id beside the source.
    # The tags go in the same call, so a version never exists without its candidate fingerprint.
    mv = retry(lambda: client.create_model_version(name, source=model_info.model_uri, run_id=run_id, tags=tags,
                                                   model_id=model_info.model_id),
               what="create model version")
    mv = _wait_ready(client, name, mv, timeout_s)
    link_logged_model(client, model_info.model_id, name, str(mv.version))
    retry(lambda: client.set_registered_model_alias(name, CANDIDATE, mv.version), what="set candidate alias")
    return str(mv.version)


def promotion_record(client: MlflowClient, name: str, version: str) -> dict | None:
    """The promotion recorded on ``version`` when it is the champion now (a run killed after promoting)."""
    if champion_version(client, name) != version:
        return None
    tags = retry(lambda: client.get_model_version(name, version), what="read model version").tags
    return {"version": version, **{k: v for k, v in tags.items() if k.startswith("promotion.")}}


def promote(client: MlflowClient, name: str, version: str, reason: str, by: str | None = None) -> dict:
    """Move ``champion`` to ``version`` and record why on the version (and who, when, what it replaced)."""
    mv = retry(lambda: client.get_model_version(name, version), what="read model version")
    if mv.status != "READY":
        raise RuntimeError(f"refusing to promote {name}/{version}: registration status is {mv.status}")
    previous = champion_version(client, name)
    record = {"promotion.reason": reason, "promotion.by": by or getpass.getuser(),
              "promotion.at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "promotion.previous_champion": previous or "none"}
    for k, v in record.items():
        retry(lambda k=k, v=v: client.set_model_version_tag(name, version, k, v), what="tag version")
    retry(lambda: client.set_registered_model_alias(name, CHAMPION, version), what="set champion alias")
    return {"version": version, **record}
