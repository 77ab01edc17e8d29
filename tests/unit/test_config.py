"""params.yaml → typed frozen config: defaults load, and bad values fail naming the key and what is allowed."""
import dataclasses
from pathlib import Path

import pytest

from vlgrpo.config import Config, ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_project_params_load_and_are_frozen():
    cfg = load_config(ROOT / "params.yaml")
    assert isinstance(cfg, Config)
    assert cfg.data.source == "synthetic" and cfg.train.loss_type == "grpo"
    assert cfg.train.gradient_accumulation_steps == cfg.train.completions_per_step // cfg.train.micro_batch_size
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.learning_rate = 1.0


@pytest.mark.parametrize("raw, key, allowed", [
    ({"train": {"lr": 1e-3}}, "train.lr", "allowed keys in 'train'"),
    ({"trian": {}}, "trian", "allowed keys in 'top level'"),
    ({"train": {"learning_rate": "fast"}}, "train.learning_rate", "must be a number"),
    ({"train": {"max_steps": 2.5}}, "train.max_steps", "must be an integer"),
    ({"train": {"max_steps": True}}, "train.max_steps", "must be an integer"),
    ({"train": {"loss_type": "ppo"}}, "train.loss_type", "'grpo', 'bnpo', 'dr_grpo', 'dapo'"),
    ({"train": {"learning_rate": 0}}, "train.learning_rate", "must be > 0"),
    ({"train": {"num_generations": 1}}, "train.num_generations", "must be >= 2"),
    ({"train": {"micro_batch_size": 7}}, "train.micro_batch_size", "must be divisible by micro_batch_size"),
    ({"train": {"top_p": 1.5}}, "train.top_p", "must be <= 1"),
    ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision", "'bf16', 'fp16', 'no'"),
    ({"data": {"source": "laion"}}, "data.source", "'synthetic', 'jsonl', 'json', 'hf', 'coco', 'flickr30k'"),
    ({"data": {"source": "jsonl"}}, "data.path", "is required"),
    ({"data": {"format": "csv"}}, "data.format", "'auto', 'messages', 'llava', 'sharegpt', 'alpaca'"),
    ({"data": {"columns": {"q": ""}}}, "data.columns.q", "must name the column"),
    ({"data": {"image_roots": "/data/coco"}}, "data.image_roots", "must be a list"),
    ({"data": {"task_mix": {"ocr": 1.0}}}, "data.task_mix.ocr", "allowed: count, color"),
    ({"data": {"synthetic": {"shapes": ["circle", "hexagon"]}}}, "data.synthetic.shapes", "unknown shape"),
    ({"data": {"synthetic": {"min_object_size": 50, "max_object_size": 40}}},
     "data.synthetic.max_object_size", "must be >= 50"),
    ({"data": {"max_pixels": 1000}}, "data.max_pixels", "must be >="),
    ({"pilot": {"overrides": {"max_stepz": 3}}}, "pilot.overrides.max_stepz", "not a train key"),
    ({"pilot": {"overrides": {"max_steps": 0}}}, "pilot.overrides.max_steps", "must be >= 1"),
    ({"rewards": {"on_error": "ignore"}}, "rewards.on_error", "'raise', 'skip'"),
    ({"train": {"importance_sampling_level": "seq"}}, "train.importance_sampling_level",
     "'token', 'sequence', 'sequence_token'"),
    ({"train": {"top_entropy_quantile": 1.5}}, "train.top_entropy_quantile", "must be <= 1"),
    ({"train": {"sync_ref_model": True, "beta": 0.0}}, "train.sync_ref_model", "needs train.beta > 0"),
    ({"train": {"ref_model_mixup_alpha": -0.1}}, "train.ref_model_mixup_alpha", "must be >= 0"),
    ({"train": {"max_resample_rounds": -1}}, "train.max_resample_rounds", "must be >= 0"),
    ({"train": {"resample_temperature": 0}}, "train.resample_temperature", "must be > 0"),
    ({"train": {"keep_best": True}}, "train.keep_best", "needs train.eval_steps"),
    ({"train": {"eval_steps": 0}}, "train.eval_steps", "must be >= 1"),
    ({"rewards": {"iou_box_format": "yolo"}}, "rewards.iou_box_format", "'qwen2.5', 'qwen3'"),
    ({"rewards": {"overlong_buffer": 0}}, "rewards.overlong_buffer", "must be >= 1"),
    ({"rewards": {"models": {"judge": 3}}}, "rewards.models.judge", "must be a string"),
    ({"base": {"tiny": {"hidden_size": 130}}}, "base.tiny.hidden_size", "divisible by num_attention_heads"),
    ({"register": {"serving": {"max_records": 0}}}, "register.serving.max_records", "must be >= 1"),
    ({"register": {"serving": {"max_new_tokens": 10**9 * 1.5}}}, "register.serving.max_new_tokens",
     "must be an integer"),
    ({"register": {"serving": {"image_folder": " "}}}, "register.serving.image_folder", "must not be empty"),
    ({"data": {"max_pixels": 50176}, "register": {"serving": {"max_image_pixels": 40000}}},
     "register.serving.max_image_pixels", "must be >= data.max_pixels (50176)"),
])
def test_bad_values_name_the_key_and_what_is_allowed(raw, key, allowed):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert f"{key}:" in str(e.value)
    assert allowed in str(e.value)


def test_objective_keys():
    assert config_from_dict({"train": {"advantage_estimator": "reinforce_plus_plus"}}).train.advantage_estimator \
        == "reinforce_pp"
    with pytest.raises(ConfigError, match="train.scale_rewards: 'batch' does not apply to advantage_estimator rloo"):
        config_from_dict({"train": {"advantage_estimator": "rloo", "scale_rewards": "batch"}})
    from vlgrpo.algo import grpo
    for est, own in grpo.OWN_SCALING.items():                  # ms-swift's settings for them are fine
        assert config_from_dict({"train": {"advantage_estimator": est, "scale_rewards": own}}).train.scale_rewards \
            == own
    with pytest.raises(ConfigError, match="train.entropy_coef: must be >= 0"):
        config_from_dict({"train": {"entropy_coef": -0.1}})
    with pytest.raises(ConfigError, match="train.sapo_temperature_neg: must be > 0"):
        config_from_dict({"train": {"loss_type": "sapo", "sapo_temperature_neg": 0}})
    with pytest.raises(ConfigError, match="train.loss_type: must be one of .*'cispo', 'sapo'"):
        config_from_dict({"train": {"loss_type": "ppo"}})


def test_file_errors_name_the_file(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("train: {learning_rate: [1, 2]}\n")
    with pytest.raises(ConfigError, match=rf"{p}: train.learning_rate: must be a number"):
        load_config(p)
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")


def test_pilot_overrides_apply_over_train():
    cfg = config_from_dict({"train": {"max_steps": 100, "learning_rate": 0.01},
                            "pilot": {"overrides": {"max_steps": 5, "subset": 16}}})
    pilot = cfg.pilot.train_config(cfg.train)
    assert (pilot.max_steps, pilot.subset, pilot.learning_rate) == (5, 16, 0.01)
    assert cfg.train.max_steps == 100  # the original is untouched


def test_int_accepted_where_float_expected_and_to_dict_round_trips():
    cfg = config_from_dict({"train": {"learning_rate": 1}})
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("raw,message", [
    ({"validate": {"max_prompt_tokens": 256}}, "validate.max_prompt_tokens: moved: the one prompt-length limit "
                                               "is train.max_prompt_tokens"),
    ({"train": {"log_every": 5}}, "train.log_every: removed: every step is logged"),
])
def test_retired_keys_say_where_they_went(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)
