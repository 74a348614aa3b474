#!/usr/bin/env bash
# The CUDA runtime's GPU check (issue 17) in one device call: every small operation's kernel
# against the CPU runtime (cuda-runtime/tests/gpu.rs), with the discipline of bench/gpu-check.sh.
#
#   bash bench/gpu-eval-check.sh prepare   # here (no GPU): the release GPU-test binary, stripped,
#                                          # and every operation's CUBIN for sm_90a (NVRTC from the
#                                          # pip wheel) in a kernel cache; all of it in gpu-eval-bundle/
#   bash bench/gpu-eval-check.sh run       # on the GPU machine: every step below, in order
#
# Device call (carry the bundle):
#   run(command="bash bench/gpu-eval-check.sh run", carry=["gpu-eval-bundle"], timeout_s=300)
#
# Each step is its own process under `timeout -k 5`, with a line before it; results are appended
# to the files under $OUT (default ./gpu-eval-check-out) as they come, 4 files:
#   summary.txt    one line per step: elapsed, seconds, name, status
#   env.txt        libraries, nvidia-smi, the kernel cache
#   gpu_tests.log  everything the test processes printed
#   gpu_report.tsv one line per check: test, case, worst error (in tolerances, or absolute), status
# The whole run keeps to FP8FORGE_CHECK_BUDGET_S (default 240 s): a step that no longer fits is
# recorded as skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-}
BUNDLE=${FP8FORGE_EVAL_BUNDLE:-gpu-eval-bundle}

# The GPU tests of cuda-runtime/tests/gpu.rs, each a step (a CPU test keeps this list equal to the file's).
GPU_TESTS="launches_refuse_mismatched_buffers_before_touching_the_gpu rms_norm_matches_the_cpu_runtime
rope_matches_the_cpu_runtime_default_and_yarn_interleaved_or_not swiglu_matches_the_cpu_runtime
softmax_routing_matches_the_cpu_runtime sigmoid_group_limited_routing_matches_the_cpu_runtime
causal_attention_matches_the_cpu_runtime_gqa_mla_and_sliding_window causal_softmax_matches_the_cpu_runtimes_score_rows
log_softmax_nll_kld_and_top1_match_the_cpu_runtime streaming_on_the_gpu_delivers_every_layer_and_pages_in_order"

usage() {
    echo "usage: bash bench/gpu-eval-check.sh prepare|run" >&2
    exit 2
}

# The release test executable of cuda-runtime/tests/$1.rs.
test_exe() {
    cargo test --release -p fp8forge-cuda-runtime --test "$1" --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$1" | tail -1
}

prepare() {
    set -e
    command -v strip >/dev/null || { echo "gpu-eval-check: strip not found" >&2; exit 1; }
    eval "$(bash kernels/ci/install_nvrtc.sh)"
    local gpu compile cache
    gpu=$(test_exe gpu)
    compile=$(test_exe compile)
    [ -n "$gpu" ] && [ -n "$compile" ] || { echo "gpu-eval-check: test executables not found" >&2; exit 1; }
    rm -rf "$BUNDLE"
    mkdir -p "$BUNDLE/kernel-cache"
    cp "$gpu" "$BUNDLE/fp8forge-eval-gpu-tests"
    strip "$BUNDLE/fp8forge-eval-gpu-tests"
    # Every operation's program for sm_90a (and sm_89) into the bundle's cache, by the compile check.
    cache=$(cd "$BUNDLE/kernel-cache" && pwd)
    FP8FORGE_KERNEL_CACHE=$cache FP8FORGE_REQUIRE_NVRTC=1 "$compile" --test-threads=1
    XZ_OPT=-9 tar -cJf "$BUNDLE/kernel-cache.tar.xz" -C "$cache" .
    rm -rf "$cache"
    {
        echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- . || echo ' (with uncommitted changes)')"
        echo "prepared $(date -u +%FT%TZ) on $(uname -m)"
        echo "nvrtc_key $(python3 -c 'import ctypes
l = ctypes.CDLL("libnvrtc.so.13"); a, b = ctypes.c_int(), ctypes.c_int()
l.nvrtcVersion(ctypes.byref(a), ctypes.byref(b)); print(f"{a.value}.{b.value}")')"
    } > "$BUNDLE/MANIFEST"
    cat "$BUNDLE/MANIFEST"
    du -sh "$BUNDLE"
    echo "device call: run(command=\"bash bench/gpu-eval-check.sh run\", carry=[\"$BUNDLE\"], timeout_s=300)"
}

OUT=${OUT:-./gpu-eval-check-out}
BUDGET=${FP8FORGE_CHECK_BUDGET_S:-240}
T0=$SECONDS
TESTS=$BUNDLE/fp8forge-eval-gpu-tests
FAILS=0

elapsed() { echo $((SECONDS - T0)); }

record() {
    case $3 in FAILED* | TIMEOUT*) FAILS=$((FAILS + 1)) ;; esac
    printf '%5ss %4ss  %-70s %s\n' "$(elapsed)" "$2" "$1" "$3" >> "$OUT/summary.txt"
}

# step NAME LIMIT_S CMD...: CMD in its own process under timeout -k 5, at most LIMIT_S and what
# the budget leaves; output to stdout and gpu_tests.log.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - $(elapsed))) logf=$OUT/gpu_tests.log
    if [ "$left" -lt 10 ]; then
        echo "=== [+$(elapsed)s] SKIP $name: budget (${left}s left)" | tee -a "$logf"
        record "$name" 0 "skipped: no time"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== [+$(elapsed)s] $name (timeout ${limit}s): $*" | tee -a "$logf"
    local t=$SECONDS tmp rc status
    tmp=$(mktemp)
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$logf" "$tmp"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) if grep -q 'SKIPPED' "$tmp"; then status="skipped (see log)"; else status=ok; fi ;;
        124 | 137) status="TIMEOUT after ${limit}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    rm -f "$tmp"
    echo "=== [+$(elapsed)s] $name: $status" | tee -a "$logf"
    record "$name" $((SECONDS - t)) "$status"
}

environment() {
    local envf=$OUT/env.txt d extra="" py
    {
        echo "== $(date -u +%FT%TZ) $(uname -srm)"
        cat "$BUNDLE/MANIFEST" 2>/dev/null
        echo "== ldconfig -p (libcuda, libnvrtc)"
        ldconfig -p 2>/dev/null | grep -E 'libcuda\.so|libnvrtc' || echo "(none in ldconfig)"
    } > "$envf"
    py=$(timeout -k 2 20 python3 -c 'import nvidia, os
for p in nvidia.__path__:
    print(os.path.join(p, "cu13", "lib"))' 2>>"$envf")
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib $py; do
        [ -d "$d" ] && extra=${extra:+$extra:}$d
    done
    export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$extra
    {
        echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
        echo "== nvidia-smi"
        timeout -k 2 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "(nvidia-smi failed)"
    } >> "$envf"
    cat "$envf"
}

run() {
    mkdir -p "$OUT"
    : > "$OUT/summary.txt"
    : > "$OUT/gpu_tests.log"
    echo "gpu-eval-check run $(date -u +%FT%TZ): budget ${BUDGET}s, output $OUT" | tee -a "$OUT/summary.txt"
    for f in "$TESTS" "$BUNDLE/kernel-cache.tar.xz"; do
        [ -e "$f" ] || { echo "gpu-eval-check: $f missing: run 'bash bench/gpu-eval-check.sh prepare' and carry $BUNDLE" | tee -a "$OUT/summary.txt"; exit 1; }
    done
    local t=$SECONDS key
    environment
    export FP8FORGE_KERNEL_CACHE=${FP8FORGE_KERNEL_CACHE:-/tmp/fp8forge-eval-kernel-cache}
    key=$(awk '$1 == "nvrtc_key" && $2 ~ /^[0-9]+\.[0-9]+$/ {print $2}' "$BUNDLE/MANIFEST" 2>/dev/null)
    [ -n "$key" ] && export FP8FORGE_KERNEL_CACHE_NVRTC=${FP8FORGE_KERNEL_CACHE_NVRTC:-$key}
    mkdir -p "$FP8FORGE_KERNEL_CACHE"
    timeout -k 5 60 tar -xJf "$BUNDLE/kernel-cache.tar.xz" -C "$FP8FORGE_KERNEL_CACHE" 2>>"$OUT/env.txt" ||
        echo "gpu-eval-check: the kernel cache did not unpack: kernels will be compiled here" | tee -a "$OUT/summary.txt"
    echo "kernel cache: $FP8FORGE_KERNEL_CACHE, $(ls "$FP8FORGE_KERNEL_CACHE" | grep -c '\.cubin$') cubins" | tee -a "$OUT/env.txt"
    export FP8FORGE_GPU_REPORT=$OUT/gpu_report.tsv RUST_BACKTRACE=1
    if timeout -k 2 20 nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
        export FP8FORGE_REQUIRE_GPU=1
        record environment $((SECONDS - t)) ok
    else
        record environment $((SECONDS - t)) "no GPU (nvidia-smi): tests will skip"
    fi
    local name
    for name in $GPU_TESTS; do
        step "$name" 60 "$TESTS" --exact "$name" --test-threads=1 --nocapture
    done
    echo "gpu-eval-check done in $(elapsed)s; $(find "$OUT" -maxdepth 1 -type f | wc -l) files in $OUT; $FAILS step(s) failed or timed out" |
        tee -a "$OUT/summary.txt"
    echo "---- summary"
    cat "$OUT/summary.txt"
    echo "---- failures in gpu_report.tsv"
    [ -f "$OUT/gpu_report.tsv" ] && awk -F'\t' '$4 != "ok"' "$OUT/gpu_report.tsv" | head -40
    [ "$FAILS" -eq 0 ]
}

main() {
    case "$MODE" in
        prepare) prepare ;;
        run) run ;;
        *) usage ;;
    esac
}

# One line, so that bash has read all of it before running (the file may be edited meanwhile).
main "$@"; exit $?
