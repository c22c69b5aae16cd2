#!/usr/bin/env bash
# Issue 14's measurements on one GPU, in one call (docs/benchmarks.md, "On one GPU").
#
# From the repository root, with DeepSpeed's wheels and a zeroloop wheel in .whl/ (git-ignored):
#     bash benchmarks/gpu_check.sh                      # everything, within BUDGET_S seconds
#     PARTS="setup tests_unset tests_cuda" bash benchmarks/gpu_check.sh   # chosen parts only
#     SMOKE=1 bash benchmarks/gpu_check.sh              # on a CPU: tiny model, a few tests
#
# Parts, in order (each skipped when it would end past BUDGET_S):
#   setup        install .whl/*.whl into /tmp/site (once; a zeroloop wheel is built if missing), versions,
#                nvidia-smi, DeepSpeed's JIT ops built
#   core         medium GPT, ZeRO-0, bf16: plain PyTorch / TrainerLoop default / hand DeepSpeed, 2 rounds
#   large        the ~383M GPT: plain PyTorch and TrainerLoop, MFU
#   compile      plain PyTorch eager / + torch.compile / TrainerLoop compile=True; TORCH_LOGS kept
#   tests_unset  the project's suite as is (no DS_ACCELERATOR)
#   tests_cuda   the project's suite with DS_ACCELERATOR=cuda
#   modes        DeepSpeed's bf16 mode (TrainerLoop, hand), hand autocast without clipping,
#                HF Trainer + DeepSpeed, Lightning's DeepSpeedStrategy
#   zero3        hand loops at ZeRO-3: torch_autocast against the bf16 mode
# Writes into $OUT (at most 8 files): gpu_check.log, summary.json, vs_pytorch_{core,large,compile,
# modes,zero3}.json, compile_logs.txt.
set -u -o pipefail

OUT=${OUT:-$(mktemp -d)}
SMOKE=${SMOKE:-0}
BUDGET_S=${BUDGET_S:-$([ "$SMOKE" = 1 ] && echo 6000 || echo 560)}
PYTHON=${PYTHON:-python3}
PARTS=${PARTS:-"setup core large compile tests_unset tests_cuda modes zero3"}
START=$(date +%s)
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.tsv.tmp"
mkdir -p "$OUT"
: > "$SUMMARY"
exec > >(tee -a "$LOG") 2>&1

if [ "$SMOKE" = 1 ]; then
    BENCH=(--device cpu --tiny)
    LARGE=(--device cpu --tiny)
    TESTS=(tests/test_testing_kit.py -k "chooses or refuses or one_gpu")
    PART_S=(setup:60 core:600 large:300 compile:900 tests_unset:300 tests_cuda:60 modes:900 zero3:600)
else
    BENCH=(--size medium --seq-len 1024 --micro-batch 16 --steps 24 --warmup 8)
    LARGE=(--size large --seq-len 1024 --micro-batch 16 --steps 16 --warmup 6)
    TESTS=(tests)
    # Seconds each part may take (its timeout; also what the budget check reserves).
    PART_S=(setup:150 core:90 large:60 compile:150 tests_unset:240 tests_cuda:240 modes:110 zero3:60)
fi
export PYTHONUNBUFFERED=1 ZEROLOOP_OTHER_DEEPSPEED_JOBS=${ZEROLOOP_OTHER_DEEPSPEED_JOBS:-0}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/zeroloop_torch_extensions}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
# This tree's zeroloop first; /tmp/site has DeepSpeed and zeroloop's metadata (its pytest plugin).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
use_site() { [ "$SMOKE" = 1 ] && return; case :$PYTHONPATH: in *:/tmp/site:*) ;; *) [ -d /tmp/site ] && export PYTHONPATH=$PWD:/tmp/site:${PYTHONPATH#"$PWD"} PATH=/tmp/site/bin:$PATH ;; esac; }
use_site

part_seconds() { for entry in "${PART_S[@]}"; do [ "${entry%%:*}" = "$1" ] && echo "${entry##*:}"; done; }
elapsed() { echo $(( $(date +%s) - START )); }

run_part() {  # run_part NAME COMMAND...: timed, budget-checked, status recorded
    local name=$1; shift
    local limit; limit=$(part_seconds "$name")
    if [ $(( $(elapsed) + limit )) -gt "$BUDGET_S" ]; then
        echo "=== $name: skipped (elapsed $(elapsed) s + $limit s > budget $BUDGET_S s)"
        printf '%s\tskipped\t0\n' "$name" >> "$SUMMARY"
        return
    fi
    echo "=== $name (limit $limit s, elapsed $(elapsed) s)"
    local began=$(date +%s)
    timeout --kill-after=10 "$limit" bash -c '"$@"' part "$@"  # the functions below are exported
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - began ))" >> "$SUMMARY"
    echo "=== $name: exit $rc after $(( $(date +%s) - began )) s"
}

setup() {
    if [ "$SMOKE" != 1 ] && [ ! -d /tmp/site/deepspeed ]; then
        ls .whl/deepspeed-*.whl || { echo "no DeepSpeed wheel in .whl/: copy /work/shared/gpu-wheels/*.whl there"; return 1; }
        ls .whl/zeroloop-*.whl || $PYTHON -m pip wheel -q --no-deps --no-build-isolation -w .whl . || return 1
        $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || return 1
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
    uptime
    $PYTHON - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpus", torch.cuda.device_count(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("deepspeed", "zeroloop", "transformers", "accelerate", "lightning", "triton", "pytest", "xdist"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as e:
        print(name, "not importable:", e)
EOF
    if [ "$SMOKE" != 1 ]; then
        # DeepSpeed JIT-builds its ops on first use: the CUDA FusedAdam for the GPU runs, and the
        # CPU ops the tests' CPU ranks use (zeroloop.testing gives those their own cache folder,
        # TORCH_EXTENSIONS_DIR/cpu-ranks: DeepSpeed names its CPU and CUDA Adam ops alike). Once,
        # in parallel, before anything is timed.
        $PYTHON -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load(); print('CUDA FusedAdam built')" &
        local builders=(CPUAdamBuilder FusedAdamBuilder ShareMemCommBuilder) pids=($!)
        for builder in "${builders[@]}"; do
            DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES= TORCH_EXTENSIONS_DIR="$TORCH_EXTENSIONS_DIR/cpu-ranks" $PYTHON -c \
                "from deepspeed.ops.op_builder.cpu import $builder; $builder().load(); print('CPU $builder built')" &
            pids+=($!)
        done
        local failed=0
        for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
        return $failed
    fi
}

bench() {  # bench NAME ARGS...: benchmarks/vs_pytorch.py into $OUT/vs_pytorch_NAME.json
    local name=$1; shift
    $PYTHON benchmarks/vs_pytorch.py "$@" --out "$OUT/vs_pytorch_$name.json"
}

suite() {  # suite ACCELERATOR TESTS...: the project's tests, DS_ACCELERATOR unset or set
    local accelerator=$1; shift
    local xdist=()
    if [ "$SMOKE" != 1 ] && $PYTHON -c "import xdist" 2>/dev/null; then
        # Parallel workers see each other's /dev/shm buffers come and go: tell the leak check.
        xdist=(-n 8 --dist loadfile)
        export ZEROLOOP_OTHER_DEEPSPEED_JOBS=1
    fi
    if [ "$accelerator" = unset ]; then
        env -u DS_ACCELERATOR $PYTHON -m pytest -q -p no:cacheprovider "${xdist[@]}" "$@" 2>&1 | tail -40
    else
        DS_ACCELERATOR=$accelerator $PYTHON -m pytest -q -p no:cacheprovider "${xdist[@]}" "$@" 2>&1 | tail -40
    fi
}
export -f setup bench suite
export SMOKE PYTHON OUT

for part in $PARTS; do
    case $part in
        setup) run_part setup setup; use_site ;;
        core) run_part core bench core "${BENCH[@]}" --rounds 2 --contenders pytorch zeroloop hand_autocast ;;
        large) run_part large bench large "${LARGE[@]}" --contenders pytorch zeroloop ;;
        compile) (export TORCH_LOGS="graph_breaks,recompiles,perf_hints"
                  run_part compile bench compile "${BENCH[@]}" --contenders pytorch pytorch_compiled zeroloop_compiled \
                      2> >(tee "$OUT/compile_logs.txt" >&2)) ;;
        tests_unset) run_part tests_unset suite unset "${TESTS[@]}" ;;
        tests_cuda) if [ "$SMOKE" = 1 ]; then run_part tests_cuda suite cpu "${TESTS[@]}"
                    else run_part tests_cuda suite cuda "${TESTS[@]}"; fi ;;
        modes) run_part modes bench modes "${BENCH[@]}" --contenders pytorch zeroloop_bf16_mode hand_bf16_mode \
                   hand_autocast_noclip hf_trainer lightning ;;
        zero3) run_part zero3 bench zero3 "${BENCH[@]}" --stage 3 --contenders pytorch hand_autocast hand_bf16_mode ;;
        *) echo "unknown part $part" ;;
    esac
done

$PYTHON - "$SUMMARY" "$OUT/summary.json" "$(elapsed)" <<'EOF'
import glob, json, os, sys
summary, out, elapsed = sys.argv[1], sys.argv[2], int(sys.argv[3])
parts = {}
for line in open(summary):
    name, status, seconds = line.rstrip("\n").split("\t")
    parts[name] = {"status": "skipped" if status == "skipped" else ("ok" if status == "0" else f"exit {status}"),
                   "seconds": int(seconds)}
ratios = {}
for path in sorted(glob.glob(os.path.join(os.path.dirname(out), "vs_pytorch_*.json"))):
    rows = json.load(open(path))["contenders"]
    ratios[os.path.basename(path)] = {name: {k: row.get(k) for k in ("tokens_per_sec", "mfu", "ratio_to_pytorch",
                                                                      "mode", "error")}
                                      for name, row in rows.items()}
json.dump({"elapsed_s": elapsed, "parts": parts, "contenders": ratios}, open(out, "w"), indent=2)
print(json.dumps({"elapsed_s": elapsed, "parts": parts}, indent=1))
for name, rows in ratios.items():
    for contender, row in rows.items():
        print(name, contender, {k: v for k, v in row.items() if v is not None})
EOF
rm -f "$SUMMARY"
