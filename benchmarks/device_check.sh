#!/usr/bin/env bash
# One GPU lease, one script: every GPU goal of benchmarks/RESULTS.md measured in stages that each
# have their own time limit, under one global deadline, with the results packed after every stage.
#
#   benchmarks/device_check.sh [--dry-run] [--stages a,b,...] [--deadline SECONDS] OUT
#
# Stages, in this order (the most important first; --stages picks a subset, same order):
#   env              python, torch, the GPU
#   cuda-tests       every gpu-marked test (tests/*.py), the submit x3 == generate() check among them
#   trainer          bare eager + compiled ViT-B/16 bf16 step vs the fed step (stablerep-bench trainer)
#   augment          GPUAugment alone at batch 2048 (stablerep-bench augment)
#   generator-paper  service vs plain diffusers, paper recipe, equal captions per call on both sides
#   generator-fast   the same for the fastest recipe (turbo-tiny)
#   online           ViT-B/16 on the GPU fed live by CPU procedural generators (stablerep-bench online)
#
# Each stage runs under `timeout`: SIGINT at its limit (the benches stop and exit 130), SIGKILL
# GRACE_S later. A stage whose limit no longer fits before the global deadline is skipped and
# recorded as such. After every stage OUT/device-check.tgz is re-packed with stages.tsv (stage,
# exit code, seconds, limit), each stage's log and its JSON, so whatever finished comes back even
# when the lease ends mid-run. OUT/stages.tsv is copied beside it.
#
# Nothing is installed from an index. Python packages the GPU machine lacks (diffusers, pyzmq,
# braceexpand, kornia, open_clip_torch, ...) come from the folder WHEELS (default .whl, ignored by
# git), built beforehand by benchmarks/device_wheels.sh and carried with the tree; they are
# installed with --no-index into a private target folder.
#
# --dry-run runs the same stages on the CPU at the smallest sizes (no wheels, this checkout's
# .venv when present): it keeps the script working on machines without a GPU (tests/test_device_check.py).
#
# Environment: PYTHON (default python3, or .venv/bin/python with --dry-run), WHEELS (default .whl),
# GRACE_S (default 10), LIMITS (per-stage limits in seconds that replace the built-in ones,
# e.g. LIMITS=trainer=200,online=60). A stage stopped at its limit records exit 124 (137 after SIGKILL).
# Exit status: 0 every stage passed, 1 a stage failed or was skipped, 2 bad usage.
set -u

usage() { echo "usage: $0 [--dry-run] [--stages a,b,...] [--deadline SECONDS] OUT" >&2; exit 2; }

ALL_STAGES="env cuda-tests trainer augment generator-paper generator-fast online"
DRY=0
STAGES=""
DEADLINE=""
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --stages) [ $# -ge 2 ] || usage; STAGES="$2"; shift ;;
    --stages=*) STAGES="${1#--stages=}" ;;
    --deadline) [ $# -ge 2 ] || usage; DEADLINE="$2"; shift ;;
    --deadline=*) DEADLINE="${1#--deadline=}" ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    -*) echo "device_check: unknown option $1" >&2; usage ;;
    *) [ -z "$OUT" ] || usage; OUT="$1" ;;
  esac
  shift
done
[ -n "$OUT" ] || usage
if [ -n "$STAGES" ]; then
  for s in ${STAGES//,/ }; do
    case " $ALL_STAGES " in *" $s "*) ;; *) echo "device_check: unknown stage '$s' (known: $ALL_STAGES)" >&2; exit 2 ;; esac
  done
fi
if [ -z "$DEADLINE" ]; then
  if [ "$DRY" = 1 ]; then DEADLINE=290; else DEADLINE=480; fi  # 5 min on 2 cores; 8 min on one H100
fi
case "$DEADLINE" in ''|*[!0-9]*) echo "device_check: --deadline must be whole seconds, got '$DEADLINE'" >&2; exit 2 ;; esac

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX")"  # logs and JSON; only the archive goes to OUT
GRACE_S="${GRACE_S:-10}"
LIMITS="${LIMITS:-}"
for override in ${LIMITS//,/ }; do
  case "${override#*=}" in ''|*[!0-9]*) echo "device_check: LIMITS entry '$override' is not STAGE=SECONDS" >&2; exit 2 ;; esac
done
START=$(date +%s)
if [ -z "${PYTHON:-}" ]; then
  if [ "$DRY" = 1 ] && [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
printf 'stage\texit\tseconds\tlimit\n' > "$WORK/stages.tsv"
{ echo "mode: $([ "$DRY" = 1 ] && echo dry-run || echo gpu)"; echo "deadline_s: $DEADLINE";
  echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"; echo "started: $(date -u +%FT%TZ)"; } > "$WORK/run.txt"

pack() {  # OUT/device-check.tgz from everything in WORK, replaced atomically
  tar -czf "$OUT/.device-check.tgz.tmp" -C "$WORK" . && mv -f "$OUT/.device-check.tgz.tmp" "$OUT/device-check.tgz"
  cp -f "$WORK/stages.tsv" "$OUT/stages.tsv"
}

FAILED=0
run_stage() {  # run_stage NAME LIMIT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  if [ -n "$STAGES" ] && [[ ",$STAGES," != *",$name,"* ]]; then return 0; fi
  local override
  for override in ${LIMITS//,/ }; do [ "${override%%=*}" = "$name" ] && limit="${override#*=}"; done
  local now left rc t0 t1
  now=$(date +%s); left=$((START + DEADLINE - now))
  if [ "$limit" -gt "$left" ]; then
    echo "== $name: skipped, limit ${limit}s does not fit the ${left}s left before the deadline" | tee -a "$WORK/run.txt"
    printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >> "$WORK/stages.tsv"
    FAILED=1; pack; return 0
  fi
  echo "== $name (limit ${limit}s, ${left}s left): $*"
  t0=$(date +%s.%N)
  timeout --signal=INT --kill-after="$GRACE_S" "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  printf '%s\t%s\t%.1f\t%s\n' "$name" "$rc" "$(awk "BEGIN { print $t1 - $t0 }")" "$limit" >> "$WORK/stages.tsv"
  [ "$rc" = 0 ] || FAILED=1
  tail -n 3 "$WORK/$name.log"
  pack
}

# Wheels the machine lacks: installed once, from the carried folder only.
if [ "$DRY" = 0 ] && compgen -G "${WHEELS:-.whl}/*.whl" > /dev/null; then
  SITE="${TMPDIR:-/tmp}/device-check-site"
  run_stage wheels 90 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${WHEELS:-.whl}"/*.whl
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi

BENCH=("$PYTHON" -m benchmarks.cli)
GPU_TEST_FILES=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
ENV_CODE='import json, platform, shutil, subprocess, torch
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
print(json.dumps(info))'

if [ "$DRY" = 1 ]; then
  run_stage env 60 "$PYTHON" -c "$ENV_CODE"
  # shellcheck disable=SC2086  # one word per file
  run_stage cuda-tests 120 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$WORK/cuda-tests.xml" $GPU_TEST_FILES
  run_stage trainer 90 "${BENCH[@]}" trainer --quick --device cpu --output "$WORK" --name trainer
  run_stage augment 60 "${BENCH[@]}" augment --quick --output "$WORK" --name augment
  run_stage generator-paper 90 "${BENCH[@]}" generator --quick --device cpu --output "$WORK" --name generator-paper
  run_stage generator-fast 90 "${BENCH[@]}" generator --quick --device cpu --output "$WORK" --name generator-fast
  run_stage online 120 "${BENCH[@]}" online --quick --device cpu --output "$WORK" --name online
else
  run_stage env 60 "$PYTHON" -c "$ENV_CODE"
  # shellcheck disable=SC2086
  run_stage cuda-tests 150 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$WORK/cuda-tests.xml" $GPU_TEST_FILES
  run_stage trainer 150 "${BENCH[@]}" trainer --precision bf16 --steps 8 --augment-batch 0 --output "$WORK" --name trainer
  run_stage augment 45 "${BENCH[@]}" augment --batch 2048 --iters 20 --output "$WORK" --name augment
  run_stage generator-paper 120 "${BENCH[@]}" generator --model random:sd15 --recipe paper --captions 8 \
    --worker-batch 4 --images-per-group 4 --output "$WORK" --name generator-paper
  run_stage generator-fast 90 "${BENCH[@]}" generator --model random:sd15 --recipe turbo-tiny --vae tiny:random \
    --captions 16 --worker-batch 8 --images-per-group 4 --output "$WORK" --name generator-fast
  run_stage online 90 "${BENCH[@]}" online --generators 2 --image-size 256 --model vit_base_patch16_224 --img-size 224 \
    --model-kwargs patch_size=16 --captions-per-step 16 --draw-per-caption 4 --steps 10 --warmup 2 --precision bf16 \
    --output "$WORK" --name online
fi

echo "finished: $(date -u +%FT%TZ), $(( $(date +%s) - START ))s" >> "$WORK/run.txt"
pack
column -t -s "$(printf '\t')" "$WORK/stages.tsv" 2>/dev/null || cat "$WORK/stages.tsv"
echo "results: $OUT/device-check.tgz"
rm -rf "$WORK"
exit "$FAILED"
