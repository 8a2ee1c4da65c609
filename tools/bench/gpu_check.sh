#!/usr/bin/env bash
# GPU check: build the C++/CUDA extensions in place, run the batched DPO log-ratio op's tests (the
# CUDA ones run only here) and its benchmark, Megatron-LM's flags, Hugging Face imports, the judge
# server, then one whole SIP step at a 1B-class shape against transformers (MFU per phase).
#
#   bash tools/bench/gpu_check.sh            # from anywhere; works in the repository root
#
# Made for the lent GPU machines (Python 3.12, a CUDA torch, no network, no megatron-core): run
# from the repository root. Megatron-Core is needed by parts of the package, not by the op; when
# it is missing and its cp312 wheel was carried along (in shared/ or the repository root), it is
# installed without dependencies (it needs only torch, numpy and packaging, already there):
#   python -m pip install --no-deps shared/megatron_core-0.16.1-cp312-*manylinux_2_28_x86_64.whl
# Likewise a carried liger_kernel-*.whl (pure Python; triton comes with CUDA torch) is installed so
# the benchmark also measures Liger-Kernel's cross entropy; without it that variant is skipped.
# Env: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: the visible GPU's), MAX_JOBS.
# Every step runs even when an earlier one fails (except after a failed build); the summary table
# comes last and the exit status is non-zero when any step failed.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
LOG_DIR=$(mktemp -d)
trap 'rm -rf "$LOG_DIR"' EXIT
declare -a STEPS=() RESULTS=() TIMES=()

# run_step NAME COMMAND...: runs the command with its output shown and kept in $LOG_DIR/NAME.log.
run_step() {
  local name=$1 start rc=0
  shift
  echo "== $name: $*"
  start=$(date +%s)
  "$@" 2>&1 | tee "$LOG_DIR/$name.log" || rc=$?
  STEPS+=("$name")
  TIMES+=("$(( $(date +%s) - start ))")
  if [ "$rc" -eq 0 ]; then RESULTS+=("ok"); else RESULTS+=("FAILED (rc=$rc)"); fi
  return "$rc"
}

summary() {
  echo
  echo "== summary"
  printf '%-10s %-18s %s\n' step result seconds
  local i
  for i in "${!STEPS[@]}"; do
    printf '%-10s %-18s %s\n' "${STEPS[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}"
  done
}

echo "== nvidia-smi -L"
nvidia-smi -L
"$PYTHON" - <<'PY'
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch")
PY

if ! "$PYTHON" -c 'import megatron.core' >/dev/null 2>&1; then
  wheel=""
  for candidate in shared/megatron_core-*.whl megatron_core-*.whl; do
    if [ -f "$candidate" ]; then wheel=$candidate; break; fi
  done
  if [ -n "$wheel" ]; then
    echo "== installing $wheel (no dependencies)"
    "$PYTHON" -m pip install --quiet --no-deps "$wheel"
  else
    echo "note: megatron-core is not installed and no megatron_core-*.whl was carried"
  fi
fi

if ! "$PYTHON" -c 'import liger_kernel' >/dev/null 2>&1; then
  for candidate in shared/liger_kernel-*.whl liger_kernel-*.whl; do
    if [ -f "$candidate" ]; then
      echo "== installing $candidate (no dependencies)"
      "$PYTHON" -m pip install --quiet --no-deps "$candidate" || echo "note: $candidate failed"
      break
    fi
  done
fi

# The judge server's web stack (fastapi, starlette, pydantic, uvicorn, h11, httpx, ...): carried
# wheels in shared/serving_wheels/ are installed without dependencies when it is missing.
if ! "$PYTHON" -c 'import fastapi, uvicorn, httpx' >/dev/null 2>&1; then
  if compgen -G "shared/serving_wheels/*.whl" >/dev/null; then
    echo "== installing shared/serving_wheels/*.whl (no dependencies)"
    "$PYTHON" -m pip install --quiet --no-deps --no-index shared/serving_wheels/*.whl \
      || echo "note: installing shared/serving_wheels failed"
  fi
fi

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c \
    'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

status=0
if ! run_step build env MEGATRON_SIP_CUDA=1 "$PYTHON" setup.py build_ext --inplace; then
  summary
  exit 1
fi
run_step import "$PYTHON" -c \
  'import torch, megatron_sip._dpo_cpu, megatron_sip._dpo_cuda as m; print("loaded", m.__file__)' \
  || status=1
run_step tests "$PYTHON" -m pytest -q tests/test_dpo_op.py tests/test_fused_linear.py tests/test_bench_dpo_logratio.py \
  || status=1
run_step bench "$PYTHON" tools/bench/bench_dpo_logratio.py --device cuda || status=1
# Megatron-LM's Llama-3 8B example flags at a tiny shape on one GPU: which flags this GPU refuses
# (FP8 and TE attention without Transformer Engine, fusions without their kernels), then 4 steps.
run_step megatron_lm "$PYTHON" tools/bench/megatron_lm_flags.py --output-dir "$LOG_DIR/megatron_lm" \
  --nproc 1 || status=1
# Tiny Hugging Face models of each supported architecture, imported and compared with
# transformers' logits on the GPU (Transformer Engine's layer spec where it is installed).
run_step hf "$PYTHON" tools/bench/hf_import_check.py --device cuda --output-dir "$LOG_DIR/hf" \
  || status=1
# tools/serve_judge.py on the GPU: judge verdicts per second, batched across concurrent requests
# vs one prompt per call, on a random judge built here (its last line is a JSON object).
if "$PYTHON" -c 'import fastapi, uvicorn, httpx' >/dev/null 2>&1; then
  run_step serving "$PYTHON" tools/bench/judge_serving.py --device cuda \
    --output-dir "$LOG_DIR/serving" || status=1
else
  echo "== serving: skipped (fastapi, uvicorn or httpx missing and no shared/serving_wheels)"
  STEPS+=("serving"); RESULTS+=("skipped"); TIMES+=("0")
fi

# One whole SIP step at a 1B-class Llama shape (Llama-3.2-1B: 16 layers, hidden 2048, 32 heads,
# 8 key/value heads, FFN 8192, vocabulary 128,256), bf16, Transformer Engine and flash decoding
# where installed: ours beside the straightforward transformers step, phase times, MFU per phase,
# a torch profile of our step (its top entries are printed).
impl=local
"$PYTHON" -c 'import transformer_engine' >/dev/null 2>&1 && impl=transformer_engine
decode=()
"$PYTHON" -c 'from flash_attn import flash_attn_with_kvcache' >/dev/null 2>&1 && decode=(--flash-decode)
run_step sip_step "$PYTHON" tools/bench/bench_sip_step.py --device cuda --bf16 \
  --transformer-impl "$impl" ${decode[@]+"${decode[@]}"} --num-layers 16 --hidden-size 2048 \
  --num-attention-heads 32 --num-query-groups 8 --ffn-hidden-size 8192 --vocab-size 128256 \
  --steps 2 --profile "$LOG_DIR/sip_step_profile" || status=1

for name in bench sip_step; do
echo
echo "== $name: last JSON line"
last_json=$(grep -E '^\s*[{[]' "$LOG_DIR/$name.log" 2>/dev/null | tail -n 1 || true)
if [ -n "$last_json" ]; then
  echo "$last_json"
  # A flat key/value view of it (nested fields as dotted paths).
  LAST_JSON=$last_json "$PYTHON" - <<'PY' || true
import json, os

def flat(value, prefix=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flat(item, f"{prefix}{key}.")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from flat(item, f"{prefix}{index}.")
    else:
        yield prefix[:-1], value

for key, value in flat(json.loads(os.environ["LAST_JSON"])):
    print(f"  {key:<48} {value:.6g}" if isinstance(value, float) else f"  {key:<48} {value}")
PY
else
  echo "(none)"
fi
done

summary
exit "$status"
