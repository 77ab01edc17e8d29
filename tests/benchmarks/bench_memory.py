"""Memory and speed at real width: full fine-tuning, LoRA and LoRA + gradient checkpointing, vlgrpo vs TRL.

    .venv/bin/python -m tests.benchmarks.bench_memory [--steps 2] [--warmup 1] [--threads 2] [--layers 2]
        [--vision-depth 2] [--rows lora_ckpt,lora,full,qwen3_5_lora_ckpt] [--device cpu|cuda] [--json out.json]

Not a pytest test (nothing is asserted); ``make bench`` runs it. The last line printed is
``memory_ratio_vs_trl=<vlgrpo LoRA+ckpt peak RSS ÷ TRL LoRA+ckpt peak RSS>`` (on a GPU: peak GPU memory).

The model: a Qwen2.5-VL with Qwen2.5-VL-3B-Instruct's real widths - hidden 2048, intermediate 11008, 16
attention heads / 2 key-value heads (head dim 128, M-RoPE sections 16/24/24), vocabulary 151,936 (tied
embedding), vision hidden 1280, intermediate 3420, 16 heads, out 2048, patch 14, merge 2, window 112 - but
``--layers`` language layers and ``--vision-depth`` vision blocks (2 and 2: ~0.54B parameters, 0.31B of them
the embedding), random weights, saved in bf16 as the real checkpoint is. The tokenizer is vlgrpo's small
trained BPE (ids beyond it are never decoded into text, so rewards see what the tokenizer can spell); the
vocabulary the model scores over is the full 151,936.

The same settings for both trainers: synthetic 224x224 images (64 visual tokens a prompt), 2 prompts a step x
G=8 completions, 16 completion tokens, one micro-batch of 16, loss grpo, beta 0.04 (a reference policy is
scored), num_iterations 1, lr 1e-5, bf16 autocast (``train.mixed_precision: bf16`` / ``GRPOConfig(bf16=True)``),
the model given as the saved directory (both load fp32 master weights: vlgrpo always, TRL by its default
``model_init_kwargs`` dtype), the accuracy reward, vision placeholder tokens never sampled, CPU. Rows:
- full: every weight trained (AdamW); the reference is a frozen second copy in both trainers.
- lora: peft LoRA r=16, alpha=32, dropout 0, on the language model's q/k/v/o/gate/up/down projections (the
  same module list for both: vlgrpo's ``train.lora``; TRL's ``peft_config``); the reference is the adapters
  switched off in both.
- lora_ckpt: lora + gradient checkpointing (``train.gradient_checkpointing`` / TRL's ``gradient_checkpointing``).
- qwen3_5_lora_ckpt: lora_ckpt on a Qwen3.5 at Qwen3.5-9B's real widths (transformers' ``Qwen3_5Config``
  defaults, which it documents as the 9B shapes): hidden 4096, intermediate 12288, vocabulary 248,320 with an
  untied output head, full attention 16 heads / 4 key-value heads of 256 (output gate, rotary on a quarter of
  each head, M-RoPE sections 11/11/10 interleaved), Gated DeltaNet 16 key / 32 value heads of 128 and a
  convolution of 4, vision hidden 1152, intermediate 4304, 16 heads, out 4096, patch 16 - with ``--layers``
  layers of each kind (2: linear, full, linear, full; ~2.9B parameters, 2.03B of them the embedding and the
  head) and ``--vision-depth`` vision blocks; its tokenizer and ``Qwen3VLProcessor`` are the tiny Qwen3.5's of
  ``tests/families.py``. The 224x224 images are 49 visual tokens at 16 px patches. A smaller step than the
  other rows (2 prompts x G=4, 8 completion tokens), so that the row runs in minutes on 2 cores; its full
  fine-tuning (16 bytes x 2.9B parameters = 47 GB) does not fit a 24 GiB machine and is not a row.

Each trainer of each row runs in its own process, one process at a time (the memory of two real-width full
fine-tunings at once would not fit a shared 24 GiB machine); the order alternates (vlgrpo first in the first
row, TRL first in the next, ...). Peak RSS is the process's ``ru_maxrss`` (loading included), which does not
depend on machine load; step seconds are the median of ``--steps`` measured steps after ``--warmup``, timed
between the step gates as in ``bench_grpo`` (prompt encoding, generation, rewards, reference scoring,
forward/backward, optimizer) and do depend on load - the load average is printed beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from tests.benchmarks.bench_grpo import (Gate, _gpu_peak_mb, _machine, run_gated_vlgrpo, run_group, trl_grpo_args,
                                         trl_image_rows, trl_step_gate, vision_token_ids, worker_main)
from tests.settings import tuned_config

ROOT = Path(__file__).resolve().parents[2]
PROMPTS_PER_STEP = 2
NUM_GENERATIONS = 8
MAX_COMPLETION = 16
IMAGE_SIZE = 224               # 224x224 px = 16x16 patches of 14 px, merged 2x2: 64 visual tokens
BETA = 0.04
LEARNING_RATE = 1e-5
NUM_TRAIN = 32
LORA = {"enabled": True, "rank": 16, "alpha": 32.0, "dropout": 0.0}
# per row: the model, what is trained, and the step (prompts x G completions of `completion` tokens)
_QWEN25_STEP = {"model": "qwen2_5_vl_3b", "prompts": PROMPTS_PER_STEP, "G": NUM_GENERATIONS,
                "completion": MAX_COMPLETION}
ROWS = {"full": {"lora": False, "ckpt": False, **_QWEN25_STEP}, "lora": {"lora": True, "ckpt": False, **_QWEN25_STEP},
        "lora_ckpt": {"lora": True, "ckpt": True, **_QWEN25_STEP},
        "qwen3_5_lora_ckpt": {"lora": True, "ckpt": True, "model": "qwen3_5_9b", "prompts": 2, "G": 4,
                              "completion": 8}}
ROW_TITLES = {"full": "full fine-tuning", "lora": "LoRA", "lora_ckpt": "LoRA + checkpointing",
              "qwen3_5_lora_ckpt": "Qwen3.5-9B widths, LoRA + checkpointing (2 prompts x G=4, 8 tokens)"}
MODEL_TITLES = {"qwen2_5_vl_3b": "Qwen2.5-VL-3B", "qwen3_5_9b": "Qwen3.5-9B"}


def data_params() -> dict:
    return {"num_train": NUM_TRAIN, "num_val": 0, "num_test": 0, "seed": 0, "min_pixels": IMAGE_SIZE ** 2,
            "max_pixels": IMAGE_SIZE ** 2, "synthetic": {"canvas_size": IMAGE_SIZE}, "out_dir": "data",
            # no videos here, but data.video_max_pixels may not be below data.min_pixels
            "video_max_pixels": IMAGE_SIZE ** 2}


# ============================================================================================= the model


def qwen25_vl_3b_config(tokenizer, layers: int, vision_depth: int):
    """Qwen2.5-VL-3B-Instruct's config with ``layers`` language layers and ``vision_depth`` vision blocks; the
    special-token ids are the given tokenizer's."""
    from transformers import Qwen2_5_VLConfig

    from vlgrpo.model.tiny_model import SPECIAL_TOKENS

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=layers,
                num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                rms_norm_eps=1e-6, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True)
    vision = dict(depth=vision_depth, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[vision_depth - 1], tokens_per_second=2, in_chans=3)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)


def build_model(model_name: str, out: Path, texts: list[str], layers: int, vision_depth: int) -> int:
    """Save the real-width model ``model_name`` (a key of :data:`MODEL_TITLES`; bf16 safetensors + processor)
    to ``out``; returns its parameter count.

    Built directly in bf16 (initialised under the bf16 default dtype), so building never holds the fp32 model:
    the machine is shared."""
    import torch
    from transformers import (GenerationConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen3_5ForConditionalGeneration)

    from vlgrpo.model import loading

    tok, processor = _tokenizer_and_processor(model_name, texts, out.parent)
    config, cls = ((qwen3_5_9b_config, Qwen3_5ForConditionalGeneration) if model_name == "qwen3_5_9b"
                   else (qwen25_vl_3b_config, Qwen2_5_VLForConditionalGeneration))
    cfg = config(tok, layers, vision_depth)
    old = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = cls(cfg)
    finally:
        torch.set_default_dtype(old)
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad,
                                               do_sample=False)
    n = sum(p.numel() for p in model.parameters())
    loading.save_model(model, processor, out)
    return n


def qwen3_5_9b_config(tokenizer, layers: int, vision_depth: int):
    """Qwen3.5-9B's config (transformers' ``Qwen3_5Config`` defaults) with ``layers`` linear-attention and
    ``layers`` full-attention layers, alternating, and ``vision_depth`` vision blocks; the special-token ids
    are the given tokenizer's."""
    from transformers import Qwen3_5Config

    from vlgrpo.model.tiny_model import SPECIAL_TOKENS

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    real = Qwen3_5Config()
    text = real.text_config.to_dict()
    for k in ("model_type", "transformers_version", "dtype", "architectures"):
        text.pop(k, None)
    text.update(num_hidden_layers=2 * layers, layer_types=["linear_attention", "full_attention"] * layers,
                # the released checkpoints' rotary: 64 rotary dims of each 256-wide head, split 11/11/10
                # over (time, height, width), interleaved
                rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": [11, 11, 10], "mrope_interleaved": True},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = real.vision_config.to_dict()
    for k in ("model_type", "transformers_version", "dtype", "architectures"):
        vision.pop(k, None)
    # the merger feeds the language model: its output is the text width (the bare default, 3584, is not)
    vision.update(depth=vision_depth, out_hidden_size=text["hidden_size"])
    return Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                         video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def _tokenizer_and_processor(model: str, texts: list[str], tmp: Path):
    """The small trained tokenizer and the family's processor (the tiny Qwen3.5's ``Qwen3VLProcessor`` with
    16 px patches for Qwen3.5; vlgrpo's tiny Qwen2.5-VL processor otherwise)."""
    from vlgrpo.config import TinyModelConfig
    from vlgrpo.model import loading, tiny_model

    if model == "qwen3_5_9b":
        from tests.families import build_family

        processor = loading.load_processor(build_family("qwen3_5", texts, tmp / "tiny_qwen3_5"))
    else:
        _, processor = tiny_model.build_tiny(texts, TinyModelConfig(), seed=0)
    return processor.tokenizer, processor


def lora_targets(model_dir: str) -> list[str]:
    """vlgrpo's ``train.lora`` target list for this model (built on the meta device: no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlgrpo.model import lora
    from vlgrpo.config import LoraConfig

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_dir))
    return lora.target_modules(model, LoraConfig(**LORA))


# ============================================================================================== workers


def _vlgrpo_worker(spec: dict, gate: Gate) -> None:
    import torch


    cfg = tuned_config({
        "data": data_params(),
        "rewards": {"weights": {"accuracy": 1.0}},
        "train": {"max_steps": spec["total_steps"], "save_steps": 10 ** 6, "prompts_per_step": spec["prompts"],
                  "num_generations": spec["G"], "micro_batch_size": spec["prompts"] * spec["G"],
                  "max_completion_length": spec["completion"], "beta": BETA, "loss_type": "grpo",
                  "num_iterations": 1, "mixed_precision": "bf16", "learning_rate": LEARNING_RATE,
                  "warmup_ratio": 0.0, "temperature": 1.0, "top_p": 1.0, "seed": 0, "max_prompt_tokens": 4096,
                  "gradient_checkpointing": spec["ckpt"], "lora": LORA if spec["lora"] else {"enabled": False}},
    })
    _, rows = run_gated_vlgrpo(cfg, Path(spec["root"]), spec["model"], Path(spec["out"]), gate)
    gate.finish(threads=torch.get_num_threads(), gpu_peak_mb=_gpu_peak_mb(spec["device"]),
                mean_length=[r["completions/mean_length"] for r in rows])


def _trl_worker(spec: dict, gate: Gate) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoConfig
    from trl import GRPOTrainer

    from vlgrpo import rewards as R

    from vlgrpo.model import loading

    dp = data_params()
    rows = [{"prompt": prompt, "image": img, "solution": it.solution}
            for it, prompt, img in trl_image_rows(Path(spec["root"]), dp["min_pixels"], dp["max_pixels"])]
    lengths: list[float] = []

    def accuracy(prompts, completions, completion_ids, solution, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        lengths.append(statistics.mean(len(c) for c in completion_ids))
        return R.accuracy(prompts, texts, solution=solution)

    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=spec["lora_targets"], bias="none")
    args = trl_grpo_args(spec, spec["prompts"] * spec["G"], BETA, LEARNING_RATE, bf16=True,
                         gradient_checkpointing=spec["ckpt"], generation_kwargs={
                             "suppress_tokens": vision_token_ids(AutoConfig.from_pretrained(spec["model"]))})
    # the model as a path, like vlgrpo's: TRL loads it with its default dtype (float32), and its own reference
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=[accuracy], args=args,
                          train_dataset=Dataset.from_list(rows),
                          processing_class=loading.load_processor(spec["model"]),
                          callbacks=[trl_step_gate(gate, spec["device"])], peft_config=peft_config)
    assert (trainer.ref_model is None) == spec["lora"]      # LoRA: adapters off, no second copy
    trainer.train()
    gate.finish(threads=torch.get_num_threads(), gpu_peak_mb=_gpu_peak_mb(spec["device"]), mean_length=lengths)


WORKERS = {"trl": _trl_worker, "vlgrpo": _vlgrpo_worker}


# =============================================================================================== parent


def prepare(tmp: Path, models: list[str], layers: int, vision_depth: int) -> tuple[Path, dict[str, int]]:
    """The dataset and each of ``models`` saved under ``tmp``; returns the dataset root and the parameter
    counts."""
    from vlgrpo.data.build import build_dataset
    from vlgrpo.data.manifest import read_manifest

    root = tmp / "ds"
    build_dataset(tuned_config({"data": data_params()}), root)
    items = read_manifest(root / "data" / "manifest.jsonl")
    texts = [t for it in items for t in (it.question, it.solution)] * 4
    return root, {m: build_model(m, tmp / m, texts, layers, vision_depth) for m in models}


def summarise(msg: dict, warmup: int, steps: int) -> dict:
    dts = msg["step_times"][warmup:warmup + steps]
    return {"step_s": statistics.median(dts), "step_times": dts, "peak_rss_mb": msg["peak_rss_mb"],
            "gpu_peak_mb": msg.get("gpu_peak_mb"), "threads": msg["threads"],
            "mean_length": msg["mean_length"][warmup:warmup + steps]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="measured steps per trainer and row (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2,
                    help="language-model layers (the 3B has 36); Qwen3.5: that many of each kind (the 9B: 24 + 8)")
    ap.add_argument("--vision-depth", type=int, default=2, help="vision blocks (the 3B has 32)")
    # LoRA rows first: the full fine-tuning row needs ~12 GB a process and is the one a shared machine may
    # not hold
    ap.add_argument("--rows", default="lora_ckpt,lora,full,qwen3_5_lora_ckpt", help=f"of {', '.join(ROWS)}")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker), WORKERS)
        return {}
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown row(s) {', '.join(unknown)}; the rows are {', '.join(ROWS)}")
    models = list(dict.fromkeys(ROWS[r]["model"] for r in rows))
    total = args.warmup + args.steps
    t0 = time.perf_counter()
    res: dict = {"machine": _machine(args.device), "device": args.device, "threads": args.threads,
                 "layers": args.layers, "vision_depth": args.vision_depth, "steps": args.steps,
                 "warmup": args.warmup, "loadavg": [os.getloadavg()], "rows": {},
                 "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)")}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        tmp = Path(tmp)
        root, res["params"] = prepare(tmp, models, args.layers, args.vision_depth)
        targets = {m: lora_targets(str(tmp / m)) for m in models}
        print("setup: " + "; ".join(f"{MODEL_TITLES[m]} widths, {res['params'][m] / 1e9:.2f}B parameters, "
                                    f"{len(targets[m])} LoRA targets" for m in models)
              + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
        for i, row in enumerate(rows):
            order = ["vlgrpo", "trl"] if i % 2 == 0 else ["trl", "vlgrpo"]      # alternate who goes first
            res["rows"][row] = {}
            for kind in order:
                spec = {"kind": kind, "root": str(root), "total_steps": total,
                        "out": str(tmp / "out" / f"{kind}-{row}"), "threads": args.threads,
                        "device": args.device, "lora_targets": targets[ROWS[row]["model"]], **ROWS[row],
                        "model": str(tmp / ROWS[row]["model"])}
                t1 = time.perf_counter()
                try:
                    got = run_group({kind: spec}, total, tmp, module="tests.benchmarks.bench_memory")
                except RuntimeError as e:
                    # a run the machine cannot hold (SIGKILL from the kernel's OOM killer: exit -9) is a result
                    # too; the other rows still run
                    res["rows"][row][kind] = {"error": str(e).splitlines()[0]}
                    print(f"{row} / {kind}: FAILED after {time.perf_counter() - t1:.0f}s: {e}", flush=True)
                    continue
                res["rows"][row][kind] = summarise(got[kind], args.warmup, args.steps)
                res["loadavg"].append(os.getloadavg())
                m = res["rows"][row][kind]
                print(f"{row} / {kind}: {time.perf_counter() - t1:.0f}s, peak RSS {m['peak_rss_mb']:.0f} MB, steps "
                      f"{', '.join(f'{x:.1f}' for x in m['step_times'])} s, load {os.getloadavg()[0]:.1f}", flush=True)
    res["wall_s"] = time.perf_counter() - t0
    key = "gpu_peak_mb" if args.device == "cuda" else "peak_rss_mb"
    r = res["rows"].get("lora_ckpt", {})
    if all("error" not in r.get(k, {"error": 1}) for k in ("vlgrpo", "trl")):
        res["memory_ratio_vs_trl"] = r["vlgrpo"][key] / r["trl"][key]
    print(report(res, key))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    if "memory_ratio_vs_trl" in res:
        print(f"memory_ratio_vs_trl={res['memory_ratio_vs_trl']:.2f}")
    return res


def _layers(model: str, layers: int) -> str:
    if model == "qwen3_5_9b":
        return f"{layers} linear-attention + {layers} full-attention layers"
    return f"{layers} language layers"


def report(r: dict, key: str) -> str:
    loads = ", ".join(f"{la[0]:.1f}" for la in r["loadavg"])
    mem = "peak GPU MB" if key == "gpu_peak_mb" else "peak RSS MB"
    lines = [f"machine: {r['machine']}; device {r['device']}; torch threads {r['threads']}, OMP_WAIT_POLICY "
             f"{r['omp_wait_policy']}; models: "
             + "; ".join(f"{MODEL_TITLES[m]} widths, {_layers(m, r['layers'])} + {r['vision_depth']} vision "
                         f"blocks ({n / 1e9:.2f}B parameters)" for m, n in r["params"].items())
             + f"; {r['warmup']} warm-up + {r['steps']} measured steps per "
             f"run, one process at a time; 1-min load average before/after each run: {loads}; "
             f"wall {r['wall_s']:.0f}s", "",
             f"| row | vlgrpo {mem} | TRL {mem} | vlgrpo/TRL memory | vlgrpo step s | TRL step s | "
             f"TRL/vlgrpo step time |", "|---|---|---|---|---|---|---|"]
    for row in [k for k in ROWS if k in r["rows"]]:               # table order: full, lora, lora_ckpt
        by = r["rows"][row]
        v, t = by["vlgrpo"], by["trl"]
        if "error" in v or "error" in t:
            err = "; ".join(f"{n}: {m['error']}" for n, m in by.items() if "error" in m)
            lines.append(f"| {ROW_TITLES[row]} | " + " | ".join(
                [f"{v[key]:.0f}" if key in v else "failed", f"{t[key]:.0f}" if key in t else "failed", "-",
                 f"{v['step_s']:.2f}" if "step_s" in v else "-", f"{t['step_s']:.2f}" if "step_s" in t else "-",
                 "-"]) + f" | ({err})")
            continue
        lines.append(f"| {ROW_TITLES[row]} | {v[key]:.0f} | {t[key]:.0f} | {v[key] / t[key]:.2f} | "
                     f"{v['step_s']:.2f} | {t['step_s']:.2f} | {t['step_s'] / v['step_s']:.2f}x |")
    rows = r["rows"]
    if all(key in rows.get(k, {}).get("vlgrpo", {}) for k in ("full", "lora_ckpt")):
        lines += ["", f"- vlgrpo LoRA + checkpointing peak / vlgrpo full fine-tuning peak = "
                      f"{rows['lora_ckpt']['vlgrpo'][key] / rows['full']['vlgrpo'][key]:.2f}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
