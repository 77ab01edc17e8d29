"""The pre-flight check: every problem of params.yaml and what it names at once, before anything starts."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks.preflight import PreflightFailed, preflight
from vlgrpo.model.precision import choose_precision, cpu_flags

REPO = Path(__file__).resolve().parents[2]


def _params(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_shipped_params_pass():
    assert preflight(REPO / "params.yaml").train.mixed_precision == "auto"


def test_every_problem_is_reported_at_once(tmp_path):
    def edit(raw):
        raw["train"]["num_generation"] = raw["train"].pop("num_generations")   # a typo
        raw["train"]["max_steps"] = "ten"                                      # a wrong type
        raw["rewards"]["weights"] = {"acuracy": 1.0, "format": 0.1}            # an unknown reward
        raw["rewards"]["plugins"] = ["missing_plugin.py", "broken.py"]
    (tmp_path / "broken.py").write_text("raise RuntimeError('half written')\n")
    with pytest.raises(PreflightFailed) as e:
        preflight(_params(tmp_path, edit))
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 5, text
    assert "train.num_generation: unknown key; did you mean 'num_generations'?" in text
    assert "train.max_steps: must be an integer, got 'ten'" in text
    assert "missing_plugin.py: file not found" in text
    assert "broken.py: RuntimeError: half written" in text
    assert "rewards.weights.acuracy: unknown reward 'acuracy'" in text


def test_plugin_rewards_are_known_and_paths_are_checked(tmp_path):
    (tmp_path / "plug.py").write_text("from vlgrpo.rewards import register\n\n@register('brevity_pf')\n"
                                      "def brevity(prompts, completions, **kw):\n"
                                      "    return [1.0 for _ in completions]\n")

    def edit(raw):
        raw["rewards"]["plugins"] = ["plug.py"]
        raw["rewards"]["weights"] = {"accuracy": 1.0, "brevity_pf": 0.5}
    assert preflight(_params(tmp_path, edit)).rewards.weights["brevity_pf"] == 0.5

    # a TRL function and an ms-swift ORM class by the names their files give them; remote rewards and
    # judges by their config names
    (tmp_path / "trl_plug.py").write_text("def brevity_trl(completions, **kwargs):\n"
                                          "    return [1.0 for _ in completions]\n")
    (tmp_path / "swift_plug.py").write_text("from swift.rewards import ORM, orms\n\n\nclass Short(ORM):\n"
                                            "    def __call__(self, completions, **kwargs):\n"
                                            "        return [1.0 for _ in completions]\n\n\n"
                                            "orms['short_orm'] = Short\n")

    def edit_foreign(raw):
        raw["rewards"]["plugins"] = ["trl_plug.py", "swift_plug.py"]
        raw["rewards"]["remote"] = {"scorer": "http://127.0.0.1:9/score"}
        raw["rewards"]["judges"] = {"judge": "http://127.0.0.1:9/v1"}
        raw["rewards"]["weights"] = {"brevity_trl": 1.0, "short_orm": 1.0, "scorer": 1.0, "judge": 1.0}
    assert set(preflight(_params(tmp_path, edit_foreign)).rewards.weights) == {"brevity_trl", "short_orm",
                                                                                "scorer", "judge"}

    def edit2(raw):
        raw["data"].update(source="jsonl", path="no/such/rows.jsonl")
        raw["base"]["model"] = "./models/not-there"
    with pytest.raises(PreflightFailed) as e:
        preflight(_params(tmp_path, edit2))
    assert [p.split(":")[0] for p in e.value.problems] == ["data.path", "base.model"]

    def edit3(raw):
        raw["train"]["rollout"] = {"engine": "vllm", "vllm": {"python": "no/such/venv/bin/python"}}
        raw["train"]["launch"] = {"num_processes": 2, "config": "configs/accelerate/no_such.yaml"}
    with pytest.raises(PreflightFailed) as e:
        preflight(_params(tmp_path, edit3))
    assert [p.split(":")[0] for p in e.value.problems] == ["train.launch.config", "train.rollout.vllm.python"]


@pytest.mark.parametrize("spelling", ["no", "false", "fp32", "'no'"])
def test_no_mixed_precision_spellings(tmp_path, spelling):
    text = (REPO / "params.yaml").read_text(encoding="utf-8").replace(
        "  mixed_precision: auto ", f"  mixed_precision: {spelling} ", 1)
    assert f"mixed_precision: {spelling} " in text
    (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
    assert preflight(tmp_path / "params.yaml").train.mixed_precision == "no"


@pytest.mark.parametrize("flags, cuda, cuda_bf16, expected", [
    ({"avx2", "fma"}, False, False, "no"),                             # AVX2 only: bf16 would be emulated
    ({"avx512f", "avx512bw"}, False, False, "no"),                     # AVX-512 without its bf16 extension
    ({"avx512f", "avx512_bf16"}, False, False, "bf16"),
    ({"amx_bf16", "amx_tile"}, False, False, "bf16"),
    ({"fp", "asimd", "bf16"}, False, False, "bf16"),                   # Arm "Features"
    (set(), True, True, "bf16"),
    (set(), True, False, "fp16"),
])
def test_auto_precision_follows_the_hardware(flags, cuda, cuda_bf16, expected):
    assert choose_precision("auto", cuda=cuda, cuda_bf16=cuda_bf16, flags=frozenset(flags))[0] == expected
    assert choose_precision("bf16", cuda=cuda, cuda_bf16=cuda_bf16, flags=frozenset(flags))[0] == "bf16"


@pytest.mark.parametrize("num_params, expected", [(600_000, "no"), (9_999_999, "no"), (10_000_000, "bf16"),
                                                  (3_000_000_000, "bf16"), (None, "bf16")])
def test_auto_precision_keeps_fp32_for_small_models_on_cpu(num_params, expected):
    flags = frozenset({"avx512f", "avx512_bf16"})
    precision, why = choose_precision("auto", cuda=False, cuda_bf16=False, flags=flags, num_params=num_params)
    assert precision == expected
    assert ("parameters" in why) == (expected == "no")
    # the size matters only on a CPU with native bf16: a GPU and an AVX2-only CPU decide as before
    assert choose_precision("auto", cuda=True, cuda_bf16=True, flags=frozenset(), num_params=num_params)[0] == "bf16"
    assert choose_precision("auto", cuda=False, cuda_bf16=False, flags=frozenset({"avx2"}),
                            num_params=num_params)[0] == "no"


def test_checkpoint_num_params_reads_the_safetensors_headers(tmp_path):
    from vlgrpo.config import TinyModelConfig
    from vlgrpo.model import loading, tiny_model
    from vlgrpo.model.precision import checkpoint_num_params

    model, proc = tiny_model.build_tiny(["What colour is it? red green"], TinyModelConfig(), 0)
    loading.save_model(model, proc, tmp_path / "ckpt")
    # the saved tensors: tied weights are stored once, so count the unique parameters
    assert checkpoint_num_params(tmp_path / "ckpt") == sum(p.numel() for p in model.parameters())
    assert checkpoint_num_params(tmp_path / "absent") is None
    assert checkpoint_num_params("Qwen/Qwen2.5-VL-3B-Instruct") is None       # a hub id: unknown
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x10")
    assert checkpoint_num_params(tmp_path / "bad") is None


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\n"
                                      "flags\t\t: fpu sse avx2 avx512f\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(tmp_path / "cpuinfo") == {"fpu", "sse", "avx2", "avx512f"}
    assert cpu_flags(tmp_path / "absent") == frozenset()


def test_repro_with_a_typo_fails_before_any_stage(tmp_path):
    """`vlgrpo repro` stops at the pre-flight check: exit 1, the key named, no dvc, Prefect or MLflow."""
    path = _params(tmp_path, lambda raw: raw["train"].update(learning_rat=raw["train"].pop("learning_rate")))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "flows.cli", "--params", str(path), "repro"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    print(f"vlgrpo repro with a typo: exit {p.returncode} after {time.perf_counter() - t0:.2f} s")
    assert p.returncode == 1
    assert "train.learning_rat: unknown key; did you mean 'learning_rate'?" in p.stderr
    assert "Traceback" not in p.stderr and "prefect" not in p.stderr.lower()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
