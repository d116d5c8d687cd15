#!/usr/bin/env bash
# The GPU verification in one command, for a machine with NVIDIA GPU(s), Python and its own torch, but no
# megatron-core / DeepSpeed / submitit and no network:
#
#   tools/gpu_check.sh [--dry]                # results under $GPU_CHECK_OUT (default build/gpu_check)
#
#   1. a fresh venv that sees the image's torch (--system-site-packages), and the wheels of
#      tools/gpu-requirements.txt installed offline from $MDU_WHEELS (default wheelhouse/, made by
#      `make wheels`); the code itself runs from this checkout (PYTHONPATH), nothing is built
#   2. the gpu-marked tests: the CPU shim is inert on CUDA; SDPA = the dense reference in fp32 (1e-5) and bf16;
#      three MDU trainer steps on the GPU with finite losses; TP=2 over NCCL where there are 2+ GPUs
#   3. `mdu-dist bench` on configs/llada_1b.yaml in bf16: JSON and a Markdown table
#
# --dry (or GPU_CHECK_DRY=1) runs every step on CPU, on a tiny model: the venv and the offline install
# included, so that a GPU run does not fail on a missing step. MDU_EXTRA_SITE=dir adds dir to the venv's path
# (a directory holding only torch, standing in for the image's own). Bounded by GPU_CHECK_TIMEOUT seconds per
# step (default 400; the whole check is meant to finish in under 8 minutes on one H100/H200).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=${GPU_CHECK_DRY:-0}
[ "${1:-}" = "--dry" ] && DRY=1
OUT=$(mkdir -p "${GPU_CHECK_OUT:-build/gpu_check}" && cd "${GPU_CHECK_OUT:-build/gpu_check}" && pwd)
WHEELS=${MDU_WHEELS:-wheelhouse}
VENV=${GPU_CHECK_VENV:-$OUT/venv}
STEP_TIMEOUT=${GPU_CHECK_TIMEOUT:-400}
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

# ---- 1. environment
[ -d "$WHEELS" ] || { log "no wheel folder $WHEELS: run 'make wheels' on a machine with network"; exit 1; }
rm -rf "$VENV"
"${PYTHON:-python3}" -m venv --system-site-packages "$VENV"
PY="$VENV/bin/python"
if [ -n "${MDU_EXTRA_SITE:-}" ]; then
  # First on the path, as an image's own packages would be (ahead of older copies in the base Python).
  "$PY" -c "import site, sys
open(site.getsitepackages()[0] + '/mdu_extra.pth', 'w').write(f'import sys; sys.path.insert(0, {sys.argv[1]!r})\n')" \
    "$MDU_EXTRA_SITE"
fi
"$PY" -c "import torch" || { log "this Python has no torch: the check uses the image's own"; exit 1; }
"$PY" -m pip --disable-pip-version-check -q install --no-index --find-links "$WHEELS" -r tools/gpu-requirements.txt
export PYTHONPATH=$PWD TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$OUT/torch_extensions}
"$PY" -c "import megatron.core, deepspeed, submitit, transformers, mdu_dist.cli" 2>/dev/null
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
log "venv $VENV: $("$PY" -c 'import sys, torch, megatron.core as m, deepspeed as d
print("python", sys.version.split()[0], "torch", torch.__version__, "megatron-core", m.__version__, "deepspeed", d.__version__)' 2>/dev/null | tail -1); $GPUS GPU(s); dry=$DRY"
if [ "$DRY" != 1 ] && [ "$GPUS" -lt 1 ]; then
  log "no CUDA device here: run with --dry to check everything but CUDA"; exit 1
fi

# ---- 2. tests. Dry: the gpu-marked tests are collected (and skipped), and their CPU counterparts run.
if [ "$DRY" = 1 ]; then
  TESTS=(-m "gpu or device or not slow" tests/test_cpu_shim.py tests/test_trainer.py::test_mdu_trainer_steps_on_the_device
         "tests/test_parallel_model.py::test_parallel_logits_and_grads_match_dense[tp1]"
         tests/test_parallel_model.py::test_sdpa_on_cuda_matches_dense)
else
  TESTS=(-m "gpu or device" tests/)
fi
log "tests: pytest ${TESTS[*]}"
if ! timeout "$STEP_TIMEOUT" "$PY" -m pytest -q -ra -p no:cacheprovider "${TESTS[@]}" --junitxml "$OUT/tests.xml" \
    2>&1 | tee "$OUT/tests.log"; then
  log "tests failed: $OUT/tests.log"; exit 1
fi
log "tests passed: $(tail -1 "$OUT/tests.log")"

# ---- 3. bench. The trainers read (and ignore) a few question/answer rows: written here, so no data folder is needed.
"$PY" -c "import json, sys
open(sys.argv[1], 'w').writelines(json.dumps({'question': f'What is item {i}?', 'answer': f'Item {i} is number {i}.'}) + '\n'
                                  for i in range(32))" "$OUT/rows.jsonl"
DATA=("data.finetune=$OUT/rows.jsonl" "data.forget=$OUT/rows.jsonl" "data.retain=$OUT/rows.jsonl")
if [ "$DRY" = 1 ]; then
  BENCH=(--config configs/llada_tiny.yaml --tiny --seq-len 32 --micro-batch-size 2 --warmup 0 --repeats 1
         --kl-rows 8 --kl-vocab 256 --kl-repeats 1 --tp 1 --attention-seq-lens 32)
else
  BENCH=(--config configs/llada_1b.yaml --tiny --seq-len 1024 --micro-batch-size 4 --warmup 2 --repeats 5
         --kl-rows 1024 4096 --kl-repeats 3 --tp 1 --attention-seq-lens 2048 optim.dtype=bf16)
fi
log "bench: mdu-dist bench ${BENCH[*]}"
if ! timeout "$STEP_TIMEOUT" "$PY" -m mdu_dist.cli bench "${BENCH[@]}" --json "$OUT/bench.json" \
    --markdown "$OUT/bench.md" "${DATA[@]}" 2>&1 | tee "$OUT/bench.log"; then
  log "bench failed: $OUT/bench.log"; exit 1
fi
log "done: $OUT/summary.txt, tests.xml, bench.json, bench.md"
