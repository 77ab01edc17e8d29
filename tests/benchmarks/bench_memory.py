"""Memory and speed at real width: full fine-tuning, LoRA and LoRA + gradient checkpointing, vlgrpo vs TRL (issue 11).

    .venv/bin/python -m tests.benchmarks.bench_memory [--steps 2] [--warmup 1] [--threads 2] [--layers 2]
        [--vision-depth 2] [--rows lora_ckpt,lora,full] [--device cpu|cuda] [--json out.json]

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
ROWS = {"full": {"lora": False, "ckpt": False}, "lora": {"lora": True, "ckpt": False},
        "lora_ckpt": {"lora": True, "ckpt": True}}
ROW_TITLES = {"full": "full fine-tuning", "lora": "LoRA", "lora_ckpt": "LoRA + checkpointing"}


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


def build_model(out: Path, texts: list[str], layers: int, vision_depth: int) -> int:
    """Save the real-width model (bf16 safetensors + processor) to ``out``; returns its parameter count.

    Built directly in bf16 (initialised under the bf16 default dtype), so building never holds the fp32 model:
    the machine is shared."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from vlgrpo.model import loading, tiny_model
    from vlgrpo.config import TinyModelConfig

    _, processor = tiny_model.build_tiny(texts, TinyModelConfig(), seed=0)   # the tokenizer + processor only
    tok = processor.tokenizer
    cfg = qwen25_vl_3b_config(tok, layers, vision_depth)
    old = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(old)
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad,
                                               do_sample=False)
    n = sum(p.numel() for p in model.parameters())
    loading.save_model(model, processor, out)
    return n


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
        "train": {"max_steps": spec["total_steps"], "save_steps": 10 ** 6, "prompts_per_step": PROMPTS_PER_STEP,
                  "num_generations": NUM_GENERATIONS, "micro_batch_size": PROMPTS_PER_STEP * NUM_GENERATIONS,
                  "max_completion_length": MAX_COMPLETION, "beta": BETA, "loss_type": "grpo",
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
    args = trl_grpo_args(spec, PROMPTS_PER_STEP * NUM_GENERATIONS, BETA, LEARNING_RATE, bf16=True,
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


def prepare(tmp: Path, layers: int, vision_depth: int) -> tuple[Path, int]:
    from vlgrpo.data.build import build_dataset
    from vlgrpo.data.manifest import read_manifest

    root = tmp / "ds"
    build_dataset(tuned_config({"data": data_params()}), root)
    items = read_manifest(root / "data" / "manifest.jsonl")
    n = build_model(tmp / "model", [t for it in items for t in (it.question, it.solution)] * 4, layers,
                    vision_depth)
    return root, n


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
    ap.add_argument("--layers", type=int, default=2, help="language-model layers (the 3B has 36)")
    ap.add_argument("--vision-depth", type=int, default=2, help="vision blocks (the 3B has 32)")
    # LoRA rows first: the full fine-tuning row needs ~12 GB a process and is the one a shared machine may
    # not hold
    ap.add_argument("--rows", default="lora_ckpt,lora,full")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker), WORKERS)
        return {}
    rows = args.rows.split(",")
    total = args.warmup + args.steps
    t0 = time.perf_counter()
    res: dict = {"machine": _machine(args.device), "device": args.device, "threads": args.threads,
                 "layers": args.layers, "vision_depth": args.vision_depth, "steps": args.steps,
                 "warmup": args.warmup, "loadavg": [os.getloadavg()], "rows": {},
                 "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)")}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        tmp = Path(tmp)
        root, res["params"] = prepare(tmp, args.layers, args.vision_depth)
        targets = lora_targets(str(tmp / "model"))
        print(f"setup: {res['params'] / 1e9:.2f}B-parameter model saved, {len(targets)} LoRA targets "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
        for i, row in enumerate(rows):
            order = ["vlgrpo", "trl"] if i % 2 == 0 else ["trl", "vlgrpo"]      # alternate who goes first
            res["rows"][row] = {}
            for kind in order:
                spec = {"kind": kind, "root": str(root), "model": str(tmp / "model"), "total_steps": total,
                        "out": str(tmp / "out" / f"{kind}-{row}"), "threads": args.threads,
                        "device": args.device, "lora_targets": targets, **ROWS[row]}
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


def report(r: dict, key: str) -> str:
    loads = ", ".join(f"{la[0]:.1f}" for la in r["loadavg"])
    mem = "peak GPU MB" if key == "gpu_peak_mb" else "peak RSS MB"
    lines = [f"machine: {r['machine']}; device {r['device']}; torch threads {r['threads']}, OMP_WAIT_POLICY "
             f"{r['omp_wait_policy']}; model: Qwen2.5-VL-3B "
             f"widths, {r['layers']} language layers + {r['vision_depth']} vision blocks "
             f"({r['params'] / 1e9:.2f}B parameters); {r['warmup']} warm-up + {r['steps']} measured steps per "
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
