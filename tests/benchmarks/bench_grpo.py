"""GRPO throughput: vlgrpo's trainer against TRL 1.x ``GRPOTrainer`` on the tiny default Qwen2.5-VL (issue 6).

    .venv/bin/python -m tests.benchmarks.bench_grpo [--steps 5] [--warmup 1] [--threads 2] [--sizes 112,448]
        [--no-ablations] [--video-size 224 | --no-video] [--json out.json] [--device cpu|cuda]
        [--precision no|bf16] [--model-config JSON]

Not a pytest test (timings are not asserted); ``make bench`` runs it. The last line printed is
``ratio_vs_trl=<vlgrpo samples/s ÷ TRL samples/s at the largest image size>``.

Setup, per image size: a synthetic dataset (``vlgrpo.data.build.build_dataset`` with the canvas at that size and
``data.min_pixels/max_pixels`` fitted to it: 112x112 → 16 visual tokens a prompt, 448x448 → 256), and one tiny
Qwen2.5-VL (``tiny_model.build_tiny`` with the default ``TinyModelConfig``) saved once and loaded by both
trainers. The same settings for both: 4 prompts a step × G=8 completions, at most 16 completion tokens,
``loss_type`` grpo, beta 0.04 (a reference model is loaded and scored), ``num_iterations`` 1, fp32, lr 1e-3, the
32 completions of a step in one forward/backward (TRL: ``per_device_train_batch_size`` 32; vlgrpo:
``micro_batch_size`` 32), no gradient checkpointing (TRL's config turns it on by default, which recomputes the
forward in backward: ``--trl-gradient-checkpointing`` measures that default), reward = vlgrpo's ``accuracy``
reward, vision placeholder tokens never sampled, the same torch thread count, CPU, no vLLM.

How it is fair on a busy machine: every trainer runs in its own worker process (so peak RSS is its own) and
stops at a gate before each optimizer step; the parent lets exactly one worker run one step at a time and
alternates them step by step (rotating who goes first), so load from other processes hits both alike. A
step's time runs from the gate opening to the end of its optimizer step: prompt encoding, generation, rewards,
reference scoring, forward/backward, optimizer (not the per-step logging). Rates come from the median step of
``--steps`` measured steps after ``--warmup`` steps.

The gates: TRL's is a ``TrainerCallback`` (``on_step_begin`` waits, ``on_step_end`` stops the clock); vlgrpo's
``train_grpo`` has no callbacks, so the worker wraps ``vlgrpo.train.data_order.step_prompt_indices`` (called first thing in
every step) with a function that waits at the gate and then calls the real one - nothing of the trainer's work
is replaced - and takes the step time from the trainer's own ``step_time_s`` minus the time spent at the gate.

On a machine other processes also load, PyTorch's OpenMP threads spin-wait for each other and both trainers
slow down several-fold and erratically; ``OMP_WAIT_POLICY=PASSIVE`` in the environment (passed on to the
workers, and printed) avoids that (docs/benchmarks.md).

Ablations (largest size, three vlgrpo workers alternating the same way): the default (shared work on), the plain
path (``train.shared_work: false``: G copies of prompt + image everywhere, like a generic trainer) and beta 0
(no reference model at all), and the default with ``OMP_WAIT_POLICY=PASSIVE`` (CPU threads that sleep instead of
spinning), with the trainer's own per-phase timings (generate / score / update), which split the shared-work
gain into generation prefill, reference forward and policy forward+backward.

Video (``--video-size``, default 224): the same settings on the synthetic ``motion`` task (4-frame videos,
frames of that size: 224 px -> 2 temporal patches x 64 = 128 video tokens a prompt), vlgrpo's shared work
against its plain path (TRL's GRPOTrainer has no video input to compare with), alternating the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from tests.settings import tuned_config

ROOT = Path(__file__).resolve().parents[2]

PROMPTS_PER_STEP = 4
NUM_GENERATIONS = 8
MAX_COMPLETION = 16
BETA = 0.04
LEARNING_RATE = 1e-3
NUM_TRAIN = 64                 # items per dataset (a run of warmup + steps steps draws 4 a step)


# ============================================================================================ helpers


def rss_mb() -> float:
    """Current resident set size of this process (MB), from /proc."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB; Linux reports ru_maxrss in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def size_params(size: int, video: bool = False) -> dict:
    """params.yaml ``data`` overrides for square synthetic images of ``size`` px, kept at that size (``video``:
    the motion task, its frames at that size)."""
    out = {"num_train": NUM_TRAIN, "num_val": 0, "num_test": 0, "seed": 0,
           "min_pixels": min(3136, size * size), "max_pixels": size * size,
           "synthetic": {"canvas_size": size}}
    if video:
        out.update(task_mix={"motion": 1.0}, video_max_pixels=size * size)
    return out


class Gate:
    """The worker's end of the step gate. The protocol is JSON lines on the original stdout; everything the
    libraries print goes to stderr (the parent sends it to a log file)."""

    def __init__(self) -> None:
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)                                    # stray prints can no longer corrupt the protocol
        self.resumed = 0.0
        self.pauses: list[float] = []                    # seconds each step waited at its gate
        self.step_times: list[float] = []                # filled by step_end (TRL) or from the metrics (vlgrpo)
        self.gpu_peak_mb: float | None = None            # peak GPU memory up to the last gate (no final save)

    def send(self, **msg) -> None:
        self._out.write(json.dumps(msg) + "\n")

    def wait(self) -> None:
        """Before a step: say so, then block until the parent says go."""
        t = time.perf_counter()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            self.gpu_peak_mb = torch.cuda.max_memory_allocated() / 2**20
        self.send(event="ready", step=len(self.pauses), rss_mb=rss_mb())
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("bench worker: parent closed the gate")
        self.resumed = time.perf_counter()
        self.pauses.append(self.resumed - t)

    def step_end(self) -> None:
        self.step_times.append(time.perf_counter() - self.resumed)

    def finish(self, **extra) -> None:
        self.send(event="done", step_times=self.step_times, peak_rss_mb=peak_rss_mb(),
                  gpu_peak_before_last_step_mb=self.gpu_peak_mb, **extra)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def _gpu_peak_mb(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch
    return torch.cuda.max_memory_allocated() / 2**20


# ===================================================================== worker helpers (bench_memory too)


def run_gated_vlgrpo(cfg, root: Path, model: str, out: Path, gate: Gate) -> tuple[dict, list[dict]]:
    """Train with ``train_grpo``, waiting at ``gate`` before every step → (run summary, metrics rows); sets
    ``gate.step_times`` from the trainer's own ``step_time_s`` minus the time spent at the gate.

    ``train_grpo`` has no callbacks: ``vlgrpo.train.data_order.step_prompt_indices`` (called first thing in every
    step) is wrapped with a function that waits at the gate and then calls the real one."""
    import vlgrpo.train.data_order as data_order_module
    from vlgrpo.train.loop import train_grpo
    from vlgrpo.train.paths import RunPaths

    real = data_order_module.step_prompt_indices

    def gated(*args, **kwargs):
        gate.wait()
        return real(*args, **kwargs)

    data_order_module.step_prompt_indices = gated     # a pause before each step; the real function does the work
    metrics = out / "metrics.jsonl"
    summary = train_grpo(cfg, RunPaths.under(root, "data/manifest.jsonl", model, out / "model", metrics),
                         progress=False)
    rows = [json.loads(ln) for ln in metrics.read_text(encoding="utf-8").splitlines() if ln.strip()]
    # The trainer's own clock starts just before the gate: take the pause out of the step.
    gate.step_times = [r["step_time_s"] - w for r, w in zip(rows, gate.pauses)]
    return summary, rows


def trl_image_rows(root: Path, min_pixels: int, max_pixels: int) -> list[tuple[object, list[dict], object]]:
    """(item, TRL chat prompt, RGB image) of each train item of the dataset under ``root``."""
    from PIL import Image

    from vlgrpo.data.manifest import read_manifest

    out = []
    for it in read_manifest(root / "data" / "manifest.jsonl", split="train"):
        with Image.open(root / "data" / it.images[0]) as im:
            img = im.convert("RGB")
        out.append((it, _trl_messages(it, min_pixels, max_pixels), img))
    return out


def trl_step_gate(gate: Gate, device: str):
    """A TRL ``TrainerCallback`` that waits at ``gate`` before each step and stops its clock after it."""
    from transformers import TrainerCallback

    class StepGate(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            gate.wait()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            gate.step_end()

    return StepGate()


def vision_token_ids(model_config) -> list[int]:
    """The vision placeholder ids, which neither trainer may sample (a sampled one would break the
    re-encoding of the completion)."""
    return sorted({int(getattr(model_config, n)) for n in ("image_token_id", "video_token_id",
                                                            "vision_start_token_id", "vision_end_token_id")})


def trl_grpo_args(spec: dict, batch: int, beta: float, learning_rate: float, **extra):
    """TRL's ``GRPOConfig`` with the settings both benchmarks give it (``batch`` completions a step in one
    forward/backward, grpo loss, constant lr, no saving, the vision tokens suppressed); the spec's ``G`` and
    ``completion`` (when given) are its completions per prompt and tokens per completion; ``extra`` adds
    ``bf16``, ``gradient_checkpointing``, ``generation_kwargs``."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=spec["out"], max_steps=spec["total_steps"], per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, num_generations=spec.get("G", NUM_GENERATIONS),
        max_completion_length=spec.get("completion", MAX_COMPLETION),
        loss_type="grpo", beta=beta, num_iterations=1, epsilon=0.2, scale_rewards="group",
        learning_rate=learning_rate, lr_scheduler_type="constant", temperature=1.0, top_p=1.0,
        use_cpu=spec["device"] == "cpu", fp16=False, report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, seed=0, max_grad_norm=1.0, **extra)


def worker_main(spec: dict, workers: dict) -> None:
    """A worker process: offline, ``spec["threads"]`` torch threads, the gate on stdout, then
    ``workers[spec["kind"]](spec, gate)``."""
    gate = Gate()
    import torch

    torch.set_num_threads(spec["threads"])
    workers[spec["kind"]](spec, gate)


# ============================================================================================ workers


def _vlgrpo_worker(spec: dict, gate: Gate) -> None:
    import torch

    from vlgrpo.model import loading, prompt_encoding
    from vlgrpo.data.manifest import read_manifest

    steps = spec["total_steps"]
    cfg = tuned_config({
        "data": {**size_params(spec["size"], spec.get("video", False)), "out_dir": "data"},
        "rewards": {"weights": {"accuracy": 1.0}},
        "train": {"max_steps": steps, "save_steps": steps, "prompts_per_step": PROMPTS_PER_STEP,
                  "num_generations": NUM_GENERATIONS, "micro_batch_size": PROMPTS_PER_STEP * NUM_GENERATIONS,
                  "max_completion_length": MAX_COMPLETION, "beta": spec["beta"], "loss_type": "grpo",
                  "num_iterations": 1, "mixed_precision": spec["precision"], "learning_rate": LEARNING_RATE,
                  "warmup_ratio": 0.0, "temperature": 1.0, "top_p": 1.0, "shared_work": spec["shared"],
                  "seed": 0},
    })
    root = Path(spec["root"])
    item = read_manifest(root / "data" / "manifest.jsonl", split="train")[0]
    model, proc = loading.load_model(spec["model"])
    params = sum(p.numel() for p in model.parameters())
    del model
    enc = prompt_encoding.encode_prompts(proc, [item], root / "data", cfg.data.min_pixels, cfg.data.max_pixels)
    pads = [proc.tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")]
    image_tokens = int(torch.isin(enc["input_ids"], torch.tensor(pads)).sum())   # visual tokens a prompt
    summary, rows = run_gated_vlgrpo(cfg, root, spec["model"], Path(spec["out"]), gate)
    # the step's clock starts just before the gate: the pause also comes out of its first phase
    phases = [{k[5:-2]: r[k] for k in r if k.startswith("time/")} for r in rows]
    for ph, w in zip(phases, gate.pauses):
        ph["encode"] -= w
    gate.finish(
        # tokens of a step: prompt tokens × G + completion tokens, as the trainer counts them
        tokens=[r["tokens_per_s"] * r["step_time_s"] for r in rows], phases=phases,
        image_tokens=image_tokens, params=params, device=summary["device"], threads=torch.get_num_threads(),
        gpu_peak_mb=_gpu_peak_mb(spec["device"]))


def _trl_messages(item, min_pixels: int, max_pixels: int) -> list[dict]:
    """The item's chat messages as a TRL dataset holds them: image placeholders, the image in its own column.

    Derived from vlgrpo's own message builder so both trainers render the very same prompt text."""
    from PIL import Image

    from vlgrpo.model import prompt_encoding

    msgs = prompt_encoding.build_messages(item, [Image.new("RGB", (1, 1))], min_pixels, max_pixels)
    return [{"role": m["role"], "content": [{"type": "image"} if p["type"] == "image"
                                            else {"type": "text", "text": p["text"]} for p in m["content"]]}
            for m in msgs]


def _trl_worker(spec: dict, gate: Gate) -> None:
    import torch
    from datasets import Dataset
    from trl import GRPOTrainer

    from vlgrpo import rewards as R

    from vlgrpo.model import loading

    sp = size_params(spec["size"])
    model, processor = loading.load_model(spec["model"])
    rows, prompt_tokens = [], []
    for it, prompt, img in trl_image_rows(Path(spec["root"]), sp["min_pixels"], sp["max_pixels"]):
        rows.append({"prompt": prompt, "image": img, "solution": it.solution, "task": it.task, "row": len(rows)})
        # tokens of this prompt as TRL's processor encodes it (image placeholders expanded)
        text = processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        prompt_tokens.append(processor(text=[text], images=[img], return_tensors="pt")["input_ids"][0])
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    image_tokens = int((prompt_tokens[0] == image_id).sum())
    n_prompt = [len(t) for t in prompt_tokens]

    step_tokens: list[float] = []

    def accuracy(prompts, completions, completion_ids, solution, row, **kwargs):
        # TRL hands conversational completions as [{"role": "assistant", "content": text}]
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        step_tokens.append(float(sum(n_prompt[r] for r in row) + sum(len(c) for c in completion_ids)))
        return R.accuracy(prompts, texts, solution=solution)

    args = trl_grpo_args(spec, PROMPTS_PER_STEP * NUM_GENERATIONS, BETA, LEARNING_RATE,
                         bf16=spec["precision"] == "bf16",
                         gradient_checkpointing=spec["trl_gradient_checkpointing"],
                         generation_kwargs={"suppress_tokens": vision_token_ids(model.config)})
    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy], args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=processor, callbacks=[trl_step_gate(gate, spec["device"])])
    # it really is the tiny model and processor (and the reference model TRL builds is loaded from that dir)
    assert trainer.model is model and trainer.processing_class is processor
    assert trainer.ref_model is not None and trainer.ref_model.config.text_config.hidden_size == \
        model.config.text_config.hidden_size
    trainer.train()
    gate.finish(tokens=step_tokens, phases=None, image_tokens=image_tokens,
                params=sum(p.numel() for p in model.parameters()), device=str(trainer.accelerator.device),
                threads=torch.get_num_threads(), gpu_peak_mb=_gpu_peak_mb(spec["device"]))


WORKERS = {"trl": _trl_worker, "vlgrpo": _vlgrpo_worker}


# ============================================================================================== parent


def prepare(tmp: Path, sizes: list[int], model_cfg: dict, video_size: int | None = None) -> dict:
    """One dataset per image size (under tmp/size-<n>/data; the video one under tmp/video-<n>, key
    ``"video"``) and the model (tmp/model): ``build_tiny`` with the default ``TinyModelConfig`` updated by
    ``model_cfg``. Returns the dataset roots."""
    from vlgrpo.model import loading, tiny_model
    from vlgrpo.config import TinyModelConfig
    from vlgrpo.data.build import build_dataset
    from vlgrpo.data.manifest import read_manifest

    roots = {}
    for s in sizes:
        root = tmp / f"size-{s}"
        build_dataset(tuned_config({"data": size_params(s)}), root)
        roots[s] = root
    items = read_manifest(roots[sizes[0]] / "data" / "manifest.jsonl")
    if video_size:
        roots["video"] = tmp / f"video-{video_size}"
        build_dataset(tuned_config({"data": size_params(video_size, video=True)}), roots["video"])
        items += read_manifest(roots["video"] / "data" / "manifest.jsonl")
    model, proc = tiny_model.build_tiny([t for it in items for t in (it.question, it.solution)] * 4,
                                      TinyModelConfig(**model_cfg), seed=0)
    loading.save_model(model, proc, tmp / "model")
    return roots


class Worker:
    def __init__(self, name: str, spec: dict, log: Path, module: str = "tests.benchmarks.bench_grpo"):
        self.name, self.log = name, log
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        if spec["device"] == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""          # both trainers on the CPU even where a GPU is present
        env.update(spec.get("env", {}))
        self._err = open(log, "w", encoding="utf-8")
        self.p = subprocess.Popen([sys.executable, "-m", module, "--worker", json.dumps(spec)],
                                  cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                  text=True, bufsize=1)

    def read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            self.p.wait()
            self._err.close()
            tail = self.log.read_text(encoding="utf-8", errors="replace")[-4000:]
            raise RuntimeError(f"bench worker {self.name} exited {self.p.returncode}; log {self.log}:\n{tail}")
        return json.loads(line)

    def go(self) -> dict:
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.p.wait(timeout=120)
        self._err.close()


def run_group(specs: dict[str, dict], total_steps: int, log_dir: Path,
              module: str = "tests.benchmarks.bench_grpo") -> dict[str, dict]:
    """Start the workers (setup in parallel, not timed), then step them one at a time, alternating.
    ``module``: the benchmark whose ``--worker`` entry runs them."""
    workers = {n: Worker(n, s, log_dir / f"{n.replace(' ', '_')}.log", module) for n, s in specs.items()}
    try:
        setup_rss = {n: w.read()["rss_mb"] for n, w in workers.items()}     # each waits at gate 0
        names = list(workers)
        done = {}
        for step in range(total_steps):
            k = step % len(names)
            for n in names[k:] + names[:k]:                                # who goes first rotates
                msg = workers[n].go()
                if msg["event"] == "done":
                    done[n] = msg
        for w in workers.values():
            w.close()
    finally:
        for w in workers.values():
            if w.p.poll() is None:
                w.p.kill()
    for n in done:
        done[n]["setup_rss_mb"] = setup_rss[n]
    return {n: done[n] for n in specs}                                     # in the order asked for


def summarise(msg: dict, warmup: int, steps: int) -> dict:
    """Medians over the measured steps (after ``warmup``)."""
    sl = slice(warmup, warmup + steps)
    dts = msg["step_times"][sl]
    n = PROMPTS_PER_STEP * NUM_GENERATIONS
    toks = msg["tokens"][sl]
    step = statistics.median(dts)
    # rates from the median step (an odd step count makes it one real step: samples/s and step s agree)
    out = {"step_s": step, "samples_per_s": n / step, "tokens_per_s": statistics.median(toks) / step,
           "peak_rss_mb": msg["peak_rss_mb"], "setup_rss_mb": msg["setup_rss_mb"],
           "image_tokens": msg["image_tokens"], "params": msg["params"], "threads": msg["threads"],
           "step_times": dts, "gpu_peak_mb": msg.get("gpu_peak_mb"), "device": msg["device"],
           "gpu_peak_before_last_step_mb": msg.get("gpu_peak_before_last_step_mb")}
    if msg.get("phases"):
        ph = msg["phases"][sl]
        out["phases"] = {k: statistics.median(p[k] for p in ph)
                         for k in ("encode", "generate", "rewards", "score", "update")}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="measured steps per trainer (medians; odd is best)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every worker")
    ap.add_argument("--sizes", default="112,448", help="square image sizes in px, comma-separated")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--video-size", type=int, default=224, help="frame side of the video row, px")
    ap.add_argument("--no-video", action="store_true", help="skip the video row")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true",
                    help="TRL's own default (recompute activations in backward); off = the same work as vlgrpo")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precision", choices=("no", "bf16"), default="no", help="no = fp32")
    ap.add_argument("--model-config", default="{}",
                    help='JSON overrides of TinyModelConfig, e.g. \'{"hidden_size": 768, "num_hidden_layers": 12}\'')
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker), WORKERS)
        return {}

    sizes = [int(s) for s in args.sizes.split(",")]
    total = args.warmup + args.steps
    model_cfg = json.loads(args.model_config)
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    results: dict = {"machine": _machine(args.device), "threads": args.threads, "warmup": args.warmup,
                     "steps": args.steps, "device": args.device, "precision": args.precision,
                     "model_config": model_cfg, "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
                     "sizes": {}, "ablations": {}, "video": {}}
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as tmp:
        tmp = Path(tmp)
        video_size = None if args.no_video else args.video_size
        roots = prepare(tmp, sizes, model_cfg, video_size)
        print(f"setup: datasets {sizes} px, tiny model saved ({time.perf_counter() - t_start:.0f}s)", flush=True)

        def spec(kind, size, tag, **kw):
            return {"kind": kind, "size": size, "root": str(roots[size]), "model": str(tmp / "model"),
                    "out": str(tmp / "out" / f"{tag}-{size}"), "total_steps": total, "threads": args.threads,
                    "beta": BETA, "shared": True, "device": args.device, "precision": args.precision,
                    "trl_gradient_checkpointing": args.trl_gradient_checkpointing, **kw}

        for s in sizes:
            t0 = time.perf_counter()
            got = run_group({"TRL GRPOTrainer": spec("trl", s, "trl"), "vlgrpo": spec("vlgrpo", s, "vlgrpo")},
                            total, tmp)
            results["sizes"][s] = {n: summarise(m, args.warmup, args.steps) for n, m in got.items()}
            print(f"size {s}: done in {time.perf_counter() - t0:.0f}s", flush=True)
        if not args.no_ablations:
            s = sizes[-1]
            t0 = time.perf_counter()
            got = run_group({"shared (default)": spec("vlgrpo", s, "ab-shared"),
                             "plain (shared_work false)": spec("vlgrpo", s, "ab-plain", shared=False),
                             "shared, beta 0 (no ref model)": spec("vlgrpo", s, "ab-beta0", beta=0.0),
                             "shared, OMP_WAIT_POLICY=PASSIVE": spec("vlgrpo", s, "ab-passive",
                                                                     env={"OMP_WAIT_POLICY": "PASSIVE"})},
                            total, tmp)
            results["ablations"] = {"size": s, **{n: summarise(m, args.warmup, args.steps) for n, m in got.items()}}
            print(f"ablations at {s}: done in {time.perf_counter() - t0:.0f}s", flush=True)
        if video_size:
            t0 = time.perf_counter()
            vspec = dict(size=video_size, video=True, root=str(roots["video"]))
            got = run_group({"video, shared (default)": {**spec("vlgrpo", sizes[0], "video-shared"), **vspec},
                             "video, plain (shared_work false)": {**spec("vlgrpo", sizes[0], "video-plain",
                                                                         shared=False), **vspec}}, total, tmp)
            results["video"] = {"size": video_size, **{n: summarise(m, args.warmup, args.steps)
                                                       for n, m in got.items()}}
            print(f"video at {video_size}: done in {time.perf_counter() - t0:.0f}s", flush=True)
    results["wall_s"] = time.perf_counter() - t_start
    results["loadavg_start"], results["loadavg_end"] = load0, os.getloadavg()
    largest = results["sizes"][sizes[-1]]
    results["ratio_vs_trl"] = largest["vlgrpo"]["samples_per_s"] / largest["TRL GRPOTrainer"]["samples_per_s"]
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"ratio_vs_trl={results['ratio_vs_trl']:.2f}")
    return results


def _machine(device: str) -> str:
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        pass
    out = f"{os.cpu_count()} cores, {model or 'unknown CPU'}"
    if device == "cuda":
        import torch
        out += f"; GPU {torch.cuda.get_device_name(0)}"
    return out


def report(r: dict) -> str:
    """The results as markdown tables (printed, and pasted into docs/benchmarks.md)."""
    gpu = r["device"] == "cuda"
    lines = [f"machine: {r['machine']}; device {r['device']}, precision {r['precision']}, model overrides "
             f"{r['model_config'] or 'none'}; TRL gradient checkpointing "
             f"{'on' if r['trl_gradient_checkpointing'] else 'off'}; torch threads {r['threads']}, "
             f"OMP_WAIT_POLICY {r['omp_wait_policy']}; "
             f"{r['warmup']} warm-up + {r['steps']} measured steps each, alternating, medians; "
             f"load avg {r['loadavg_start'][0]:.1f} at start, "
             f"{r['loadavg_end'][0]:.1f} at end; wall {r['wall_s']:.0f}s",
             "",
             "| image | visual tokens | trainer | params | samples/s | tokens/s | step s | peak RSS MB "
             "| RSS after setup MB |" + (" peak GPU MB |" if gpu else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for s, by in r["sizes"].items():
        for n, m in by.items():
            lines.append(f"| {s}x{s} | {m['image_tokens']} | {n} | {m['params'] / 1e6:.2f}M | "
                         f"{m['samples_per_s']:.2f} | {m['tokens_per_s']:.0f} | {m['step_s']:.2f} | "
                         f"{m['peak_rss_mb']:.0f} | {m['setup_rss_mb']:.0f} |"
                         + (f" {m['gpu_peak_mb']:.0f} |" if gpu else ""))
    lines.append("")
    for s, by in r["sizes"].items():
        t, v = by["TRL GRPOTrainer"], by["vlgrpo"]
        mem = f"peak RSS vlgrpo/TRL = {v['peak_rss_mb'] / t['peak_rss_mb']:.2f}"
        if gpu:
            mem += (f", peak GPU memory vlgrpo/TRL = {v['gpu_peak_mb'] / t['gpu_peak_mb']:.2f} (up to the last "
                    f"step, before vlgrpo's final save: {v['gpu_peak_before_last_step_mb']:.0f} vs "
                    f"{t['gpu_peak_before_last_step_mb']:.0f} MB)")
        lines.append(f"- {s}x{s}: vlgrpo/TRL samples/s = {v['samples_per_s'] / t['samples_per_s']:.2f}; {mem}")
    ab = r.get("ablations")
    if ab:
        lines += ["", f"ablations (vlgrpo, {ab['size']}x{ab['size']}; the trainer's own phase timings, medians, s; "
                      "score = reference forward):", "",
                  "| variant | samples/s | step s | encode | generate | score | update | peak RSS MB |",
                  "|---|---|---|---|---|---|---|---|"]
        for n, m in ab.items():
            if n == "size":
                continue
            p = m["phases"]
            lines.append(f"| {n} | {m['samples_per_s']:.2f} | {m['step_s']:.2f} | {p['encode']:.3f} | "
                         f"{p['generate']:.3f} | {p['score']:.3f} | {p['update']:.3f} | {m['peak_rss_mb']:.0f} |")
        sh, pl = ab["shared (default)"], ab["plain (shared_work false)"]
        b0 = ab["shared, beta 0 (no ref model)"]
        lines += ["", f"- shared work on vs off: steps {pl['step_s'] / sh['step_s']:.2f}x faster; generation "
                      f"{pl['phases']['generate'] / sh['phases']['generate']:.2f}x "
                      f"({pl['phases']['generate'] - sh['phases']['generate']:.2f}s saved), reference forward "
                      f"{pl['phases']['score'] / sh['phases']['score']:.2f}x "
                      f"({pl['phases']['score'] - sh['phases']['score']:.2f}s), policy forward+backward "
                      f"{pl['phases']['update'] / sh['phases']['update']:.2f}x "
                      f"({pl['phases']['update'] - sh['phases']['update']:.2f}s)",
                  f"- no reference model (beta 0): step {b0['step_s']:.2f}s vs {sh['step_s']:.2f}s with beta {BETA}; "
                  f"a no-grad scoring pass costs {sh['phases']['score']:.2f}s - also what num_iterations 1 saves "
                  f"by skipping the old-policy forward"]
        ps = ab.get("shared, OMP_WAIT_POLICY=PASSIVE")
        if ps:
            lines.append(f"- OMP_WAIT_POLICY=PASSIVE: step {ps['step_s']:.2f}s vs {sh['step_s']:.2f}s with the "
                         f"environment's policy, {r['omp_wait_policy']}")
    return "\n".join(lines + _video_report(r.get("video")))


def _video_report(v: dict | None) -> list[str]:
    if not v:
        return []
    lines = ["", f"video (motion task, 4 frames of {v['size']}x{v['size']}; vlgrpo, the trainer's own phase "
                 "timings, medians, s):", "",
             "| variant | visual tokens | samples/s | step s | generate | score | update | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for n, m in v.items():
        if n != "size":
            p = m["phases"]
            lines.append(f"| {n} | {m['image_tokens']} | {m['samples_per_s']:.2f} | {m['step_s']:.2f} | "
                         f"{p['generate']:.3f} | {p['score']:.3f} | {p['update']:.3f} | {m['peak_rss_mb']:.0f} |")
    sh, pl = v["video, shared (default)"], v["video, plain (shared_work false)"]
    lines += ["", f"- video, shared work on vs off: steps {pl['step_s'] / sh['step_s']:.2f}x faster; peak RSS "
                  f"shared/plain = {sh['peak_rss_mb'] / pl['peak_rss_mb']:.2f}"]
    return lines

if __name__ == "__main__":
    main()
