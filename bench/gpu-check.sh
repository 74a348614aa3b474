#!/usr/bin/env bash
# The kernels' GPU check in one device call that cannot waste the window (issue 12).
#
#   bash bench/gpu-check.sh prepare      # here (no GPU): release binaries, stripped; every kernel
#                                        # variant's CUBIN for sm_90a built with NVRTC from the pip
#                                        # wheel into a kernel cache; all of it in gpu-bundle/
#                                        # (ignored by git); fails if repository + bundle >= 60 MB
#   bash bench/gpu-check.sh run          # on the GPU machine: every step below, in order
#   bash bench/gpu-check.sh size-check   # only the size check of prepare (FP8FORGE_BUNDLE_LIMIT_MB)
#   bash bench/gpu-check.sh tune         # on the GPU machine (issue 13), its own device call: the tuner
#                                        # on DeepSeek-V3's shapes (M 64, 128, 4096, and the grouped
#                                        # shapes) in at most FP8FORGE_TUNE_S (360 s), then calibration,
#                                        # an exhaustive run of the M = 64 shapes in what is left, and the
#                                        # issue's ratios; same bundle (every CUBIN precompiled), same
#                                        # discipline (timeout -k per step, a line before each launch,
#                                        # results appended as they come); at most 8 files under $OUT:
#     summary.txt  tune.log  tune.jsonl (one autotune --json per step)  table.yaml
#     table.calibration.yaml  calibrate.json  exhaustive.yaml  ratios.txt
#
# Device call for the tuner:
#   run(command="bash bench/gpu-check.sh tune", carry=["gpu-bundle"], timeout_s=600)
#
# Device call (carry the bundle):
#   run(command="bash bench/gpu-check.sh run", carry=["gpu-bundle"], timeout_s=600)
#
# `run` compiles nothing unless the kernel cache misses (a different NVRTC there); it prints the
# libraries first and sets LD_LIBRARY_PATH; each step is its own process under `timeout -k 5`,
# with a line before it; results are appended to the files under $OUT (default ./gpu-check-out)
# as they come, at most 8 files:
#   summary.txt     one line per step: elapsed, seconds, status, name (and the table at the end)
#   env.txt         libraries (ldconfig -p, PyTorch's nvidia/cu13/lib), nvidia-smi before/after
#   gpu_tests.log   everything the GPU test processes printed
#   gpu_report.tsv  one line per variant and shape (rel_err vs f64, contract check, status)
#   bench.jsonl     one `bench gemm --json` object per shape (ours and cuBLASLt interleaved)
#   bench.log       the bench processes' stderr
#   bench.txt       the bench table (made from bench.jsonl at the end)
# Order: environment, act_quant, mma.sync, one wgmma config per family, cuBLASLt baselines, every
# variant (one process per family), determinism (20 runs bitwise), bench gemm on the 22 shapes of
# BENCH_TARGETS.md. The whole run keeps to FP8FORGE_CHECK_BUDGET_S (default 530 s): a step that
# no longer fits is recorded as skipped, and the bench keeps FP8FORGE_BENCH_RESERVE_S (150 s).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-}
BUNDLE=${FP8FORGE_BUNDLE:-gpu-bundle}
LIMIT_MB=${FP8FORGE_BUNDLE_LIMIT_MB:-60}

# The configurations of the per-family smoke step: BM 64/128/256, a BN that does not divide 128,
# multicast A, multicast B (dense shapes), and the grouped kernel.
SMOKE_DENSE="wgmma_bm64_bn128_s4_mc1_sw128 wgmma_bm128_bn128_s4_mc1_sw128 wgmma_bm256_bn128_s4_mc1_sw128
wgmma_bm128_bn160_s4_mc1_sw128 wgmma_bm128_bn128_s4_mcA2_sw128 wgmma_bm128_bn128_s4_mcB2_sw128"
SMOKE_GROUPED="wgmma_bm128_bn128_s4_mc1_sw128"
# The wgmma families of the search space, then the speed variants (fp8forge_kernels::filter::
# families; a unit test keeps this list equal to it); mma.sync runs as its own step before them.
FAMILIES="wgmma_bm64_mc1 wgmma_bm64_mcA2 wgmma_bm64_mcB2 wgmma_bm128_mc1 wgmma_bm128_mcA2 wgmma_bm128_mcB2
wgmma_bm256_mc1 wgmma_bm256_mcA2 wgmma_bm256_mcB2 speed"
# BENCH_TARGETS.md: M x N x K (dense), then tokens-per-expert x N x K : experts (grouped).
BENCH_NK="2112x7168 24576x1536 32768x512 7168x16384 4096x7168 7168x2048"
BENCH_GROUPED="8192x4096x7168:4 8192x7168x2048:4 4096x4096x7168:8 4096x7168x2048:8"

usage() {
    echo "usage: bash bench/gpu-check.sh prepare|run|tune|size-check" >&2
    exit 2
}

# ---------------------------------------------------------------------------------------------
# prepare (here)

# Sizes in bytes of what travels: tracked and untracked-not-ignored files, and the bundle.
repo_bytes() {
    { git ls-files -z; git ls-files -z -o --exclude-standard; } | xargs -0 -r stat -c %s -- 2>/dev/null |
        awk '{s += $1} END {print s + 0}'
}

size_check() {
    local repo bundle total limit
    repo=$(repo_bytes)
    bundle=$(find "$BUNDLE" -type f -printf '%s\n' 2>/dev/null | awk '{s += $1} END {print s + 0}')
    total=$((repo + bundle))
    limit=$((LIMIT_MB * 1000 * 1000))
    echo "sizes: repository $((repo / 1000)) kB + bundle $((bundle / 1000)) kB = $((total / 1000)) kB (limit ${LIMIT_MB} MB)"
    if [ -d "$BUNDLE" ]; then
        find "$BUNDLE" -maxdepth 1 -type f -printf '  %s\t%p\n' | sort -n
    fi
    if [ "$total" -ge "$limit" ]; then
        echo "gpu-check: repository + bundle = $((total / 1000)) kB, not under ${LIMIT_MB} MB: it would not travel" >&2
        return 1
    fi
}

# The release test executable of kernels/tests/gpu.rs.
gpu_test_exe() {
    cargo test --release -p fp8forge-kernels --test gpu --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "gpu" and m.get("executable"):
        print(m["executable"])' | tail -1
}

prepare() {
    set -e
    command -v strip >/dev/null || { echo "gpu-check: strip not found" >&2; exit 1; }
    eval "$(bash kernels/ci/install_nvrtc.sh)"
    cargo build --release -p fp8forge-cli
    local exe target
    exe=$(gpu_test_exe)
    [ -n "$exe" ] || { echo "gpu-check: could not find the gpu test executable" >&2; exit 1; }
    target=${CARGO_TARGET_DIR:-target}
    rm -rf "$BUNDLE"
    mkdir -p "$BUNDLE"
    cp "$target/release/fp8forge" "$BUNDLE/fp8forge"
    cp "$exe" "$BUNDLE/fp8forge-gpu-tests"
    strip "$BUNDLE/fp8forge" "$BUNDLE/fp8forge-gpu-tests"
    # Every variant into a cache that persists here between prepares; only this source's
    # variants (their keys are in the report) go into the bundle.
    local cache=$target/gpu-kernel-cache
    mkdir -p "$cache"
    set +e
    FP8FORGE_KERNEL_CACHE=$cache "$BUNDLE/fp8forge" kernels precompile --arch sm_90a --report "$BUNDLE/build_report.tsv"
    local rc=$?
    set -e
    [ -s "$BUNDLE/build_report.tsv" ] || { echo "gpu-check: no build report (exit $rc)" >&2; exit 1; }
    local failed
    failed=$(awk -F'\t' 'NR > 1 && $3 ~ /^failed/' "$BUNDLE/build_report.tsv" | wc -l)
    [ "$failed" -eq 0 ] || echo "gpu-check: WARNING: $failed variant(s) failed to build (build_report.tsv); the GPU tests record them per variant"
    awk -F'\t' 'NR > 1 && $9 != "-" && $3 !~ /^failed/ {print $9 ".cubin"; print $9 ".log"}' "$BUNDLE/build_report.tsv" \
        > "$target/gpu-kernel-cache.list"
    XZ_OPT=-9 tar -cJf "$BUNDLE/kernel-cache.tar.xz" -C "$cache" -T "$target/gpu-kernel-cache.list"
    {
        echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- . || echo ' (with uncommitted changes)')"
        echo "prepared $(date -u +%FT%TZ) on $(uname -m)"
        # The cache keys' NVRTC version (MAJOR.MINOR), so that `run` uses the cache whatever NVRTC it finds.
        echo "nvrtc_key $(python3 -c 'import ctypes
l = ctypes.CDLL("libnvrtc.so.13"); a, b = ctypes.c_int(), ctypes.c_int()
l.nvrtcVersion(ctypes.byref(a), ctypes.byref(b)); print(f"{a.value}.{b.value}")')"
        echo "variants $(($(wc -l < "$BUNDLE/build_report.tsv") - 1)), failed $failed, cubins $(($(wc -l < "$target/gpu-kernel-cache.list") / 2))"
    } > "$BUNDLE/MANIFEST"
    cat "$BUNDLE/MANIFEST"
    size_check
    echo "device call: run(command=\"bash bench/gpu-check.sh run\", carry=[\"$BUNDLE\"], timeout_s=600)"
}

# ---------------------------------------------------------------------------------------------
# run (on the GPU machine)

OUT=${OUT:-./gpu-check-out}
BUDGET=${FP8FORGE_CHECK_BUDGET_S:-530}
BENCH_RESERVE=${FP8FORGE_BENCH_RESERVE_S:-150}
T0=$SECONDS
TESTS=$BUNDLE/fp8forge-gpu-tests
BIN=$BUNDLE/fp8forge

elapsed() { echo $((SECONDS - T0)); }

log() { echo "$*" | tee -a "$OUT/summary.txt"; }

# Appends one line per step to summary.txt: elapsed, seconds, name, status.
FAILS=0
record() {
    case $3 in FAILED* | TIMEOUT*) FAILS=$((FAILS + 1)) ;; esac
    printf '%5ss %4ss  %-44s %s\n' "$(elapsed)" "$2" "$1" "$3" >> "$OUT/summary.txt"
}

# step NAME LIMIT_S RESERVE_S LOG CMD...: runs CMD in its own process under timeout -k 5, with
# at most LIMIT_S and what the budget leaves after RESERVE_S; output to stdout and LOG.
step() {
    local name=$1 limit=$2 reserve=$3 logf=$4
    shift 4
    local left=$((BUDGET - $(elapsed) - reserve))
    if [ "$left" -lt 10 ]; then
        echo "=== [+$(elapsed)s] SKIP $name: budget (${left}s left)" | tee -a "$logf"
        record "$name" 0 "skipped: no time"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== [+$(elapsed)s] $name (timeout ${limit}s): $*" | tee -a "$logf"
    local t=$SECONDS tmp
    tmp=$(mktemp)
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$logf" "$tmp"
    local rc=${PIPESTATUS[0]} status
    case $rc in
        0) if grep -q 'SKIPPED' "$tmp"; then status="skipped ($(grep -m1 -o 'no CUDA device' "$tmp" || echo 'see log'))"; else status=ok; fi ;;
        124 | 137) status="TIMEOUT after ${limit}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    rm -f "$tmp"
    echo "=== [+$(elapsed)s] $name: $status" | tee -a "$logf"
    record "$name" $((SECONDS - t)) "$status"
}

# A GPU test by exact name, with extra environment (NAME=VALUE ...).
gpu_test() {
    local name=$1 limit=$2 reserve=$3 test=$4
    shift 4
    step "$name" "$limit" "$reserve" "$OUT/gpu_tests.log" env "$@" "$TESTS" --exact "$test" --test-threads=1 --nocapture
}

# Libraries first: printed, and their folders on LD_LIBRARY_PATH.
environment() {
    local envf=$OUT/env.txt d
    {
        echo "== $(date -u +%FT%TZ) $(uname -srm)"
        cat "$BUNDLE/MANIFEST" 2>/dev/null
        echo "== ldconfig -p (libcuda, libnvrtc, libnvrtc-builtins, libcublasLt)"
        ldconfig -p 2>/dev/null | grep -E 'libcuda\.so|libnvrtc|libcublasLt' || echo "(none in ldconfig)"
        echo "== PyTorch's nvidia/cu13/lib"
    } > "$envf"
    local py
    py=$(timeout -k 2 20 python3 -c 'import nvidia, os
for p in nvidia.__path__:
    print(os.path.join(p, "cu13", "lib"))' 2>>"$envf")
    local extra=""
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib $py; do
        [ -d "$d" ] || continue
        ls "$d" 2>/dev/null | grep -E '^lib(nvrtc|cublasLt|cuda)' | sed "s|^|$d/|" >> "$envf"
        extra=${extra:+$extra:}$d
    done
    # System CUDA first (the NVRTC the cache was built with is 13.0), PyTorch's wheels after.
    export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$extra
    {
        echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
        echo "== nvidia-smi"
        timeout -k 2 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>&1 || echo "(nvidia-smi failed)"
    } >> "$envf"
    cat "$envf"
}

have_gpu() {
    timeout -k 2 20 nvidia-smi -L 2>/dev/null | grep -q '^GPU '
}

bench_shape() {
    local name=$1
    shift
    local left=$((BUDGET - $(elapsed)))
    if [ "$left" -lt 15 ]; then
        echo "=== [+$(elapsed)s] SKIP bench $name: budget" | tee -a "$OUT/bench.log"
        record "bench $name" 0 "skipped: no time"
        return 0
    fi
    local limit=90
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== [+$(elapsed)s] bench $name (timeout ${limit}s): $BIN bench gemm $* --json" | tee -a "$OUT/bench.log"
    local t=$SECONDS json
    json=$(timeout -k 5 "$limit" "$BIN" bench gemm "$@" --json 2>>"$OUT/bench.log")
    local rc=$? status
    [ -n "$json" ] && printf '%s\n' "$json" | tr -d '\n' >> "$OUT/bench.jsonl" && echo >> "$OUT/bench.jsonl"
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${limit}s" ;;
        *) if tail -1 "$OUT/bench.log" | grep -q 'no CUDA device'; then
               status="skipped (no CUDA device)"
           else
               status="FAILED (exit $rc: $(tail -1 "$OUT/bench.log" | cut -c1-120))"
           fi ;;
    esac
    echo "=== [+$(elapsed)s] bench $name: $status" | tee -a "$OUT/bench.log"
    record "bench $name" $((SECONDS - t)) "$status"
}

bench_table() {
    timeout -k 2 30 python3 - "$OUT/bench.jsonl" > "$OUT/bench.txt" 2>&1 <<'PY'
import json, sys
rows = []
for line in open(sys.argv[1]):
    line = line.strip()
    if line:
        try:
            rows += json.loads(line).get("rows", [])
        except Exception as e:
            print(f"bad line: {e}")
print("| M | N×K | E | ours TFLOP/s (config) | cuBLASLt BF16 | cuBLASLt FP8 block | ours/FP8 block | rel_err ours |")
print("|---|---|---|---|---|---|---|---|")
shapes = []
for r in rows:
    s = (r["m"], r["n"], r["k"], r["groups"])
    if s not in shapes:
        shapes.append(s)
for s in shapes:
    rs = [r for r in rows if (r["m"], r["n"], r["k"], r["groups"]) == s]
    def best(impl):
        c = [r for r in rs if r["impl"] == impl and r.get("tflops")]
        return max(c, key=lambda r: r["tflops"]) if c else None
    o, b, f = best("fp8forge"), best("cublaslt_bf16"), best("cublaslt_fp8_block")
    t = lambda r: f"{r['tflops']:.0f}" if r else "-"
    ours = f"{t(o)} ({o['config']})" if o else "- (" + "; ".join(str(r.get("error")) for r in rs if r["impl"] == "fp8forge") + ")"
    ratio = f"{o['tflops'] / f['tflops']:.2f}" if o and f else "-"
    err = f"{o['rel_err']:.1e}" if o and o.get("rel_err") is not None else "-"
    print(f"| {s[0]} | {s[1]}×{s[2]} | {s[3]} | {ours} | {t(b)} | {t(f)} | {ratio} | {err} |")
PY
}

run() {
    mkdir -p "$OUT"
    : > "$OUT/summary.txt"
    : > "$OUT/bench.jsonl"
    : > "$OUT/gpu_tests.log"
    : > "$OUT/bench.log"
    log "gpu-check run $(date -u +%FT%TZ): budget ${BUDGET}s, output $OUT"
    for f in "$TESTS" "$BIN" "$BUNDLE/kernel-cache.tar.xz"; do
        [ -e "$f" ] || { log "gpu-check: $f missing: run 'bash bench/gpu-check.sh prepare' and carry $BUNDLE"; exit 1; }
    done
    local t=$SECONDS
    environment
    export FP8FORGE_KERNEL_CACHE=${FP8FORGE_KERNEL_CACHE:-/tmp/fp8forge-kernel-cache}
    # Use the bundled cache as built (NVRTC 13.0 from the wheel), whatever NVRTC this machine has.
    local key
    key=$(awk '$1 == "nvrtc_key" && $2 ~ /^[0-9]+\.[0-9]+$/ {print $2}' "$BUNDLE/MANIFEST" 2>/dev/null)
    [ -n "$key" ] && export FP8FORGE_KERNEL_CACHE_NVRTC=${FP8FORGE_KERNEL_CACHE_NVRTC:-$key}
    mkdir -p "$FP8FORGE_KERNEL_CACHE"
    timeout -k 5 60 tar -xJf "$BUNDLE/kernel-cache.tar.xz" -C "$FP8FORGE_KERNEL_CACHE" 2>>"$OUT/env.txt" ||
        timeout -k 5 60 python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
            "$BUNDLE/kernel-cache.tar.xz" "$FP8FORGE_KERNEL_CACHE" ||
        log "gpu-check: the kernel cache did not unpack: kernels will be compiled here"
    echo "kernel cache: $FP8FORGE_KERNEL_CACHE, $(ls "$FP8FORGE_KERNEL_CACHE" | grep -c '\.cubin$') cubins, keys of NVRTC ${FP8FORGE_KERNEL_CACHE_NVRTC:-(the one loaded)}" | tee -a "$OUT/env.txt"
    export FP8FORGE_GPU_REPORT=$OUT/gpu_report.tsv RUST_BACKTRACE=1
    if have_gpu; then
        export FP8FORGE_REQUIRE_GPU=1
        record environment $((SECONDS - t)) ok
    else
        record environment $((SECONDS - t)) "no GPU (nvidia-smi): tests will skip"
    fi
    local R=$BENCH_RESERVE
    gpu_test act_quant 60 "$R" act_quant_matches_its_reference_bit_for_bit
    gpu_test mma.sync 120 "$R" every_variant_matches_the_cpu_reference FP8FORGE_GPU_FILTER=family:mma
    local id
    for id in $SMOKE_DENSE; do
        gpu_test "smoke $id" 45 "$R" every_variant_matches_the_cpu_reference FP8FORGE_GPU_FILTER="$id" FP8FORGE_GPU_SHAPES=dense
    done
    for id in $SMOKE_GROUPED; do
        gpu_test "smoke $id grouped" 45 "$R" every_variant_matches_the_cpu_reference FP8FORGE_GPU_FILTER="$id" FP8FORGE_GPU_SHAPES=grouped
    done
    gpu_test "launch rules" 30 "$R" multicast_and_grouped_rules_hold_at_launch
    gpu_test cublaslt 60 "$R" cublaslt_baselines_match_the_reference
    local fam
    for fam in $FAMILIES; do
        gpu_test "family $fam" 120 "$R" every_variant_matches_the_cpu_reference FP8FORGE_GPU_FILTER="family:$fam"
    done
    gpu_test determinism 60 "$R" one_config_is_bitwise_deterministic
    local nk m e
    for m in 64 128 4096; do
        for nk in $BENCH_NK; do
            bench_shape "${m}x$nk" --shape "${m}x$nk"
        done
    done
    for e in $BENCH_GROUPED; do
        bench_shape "${e%%:*} E=${e##*:}" --shape "${e%%:*}" --groups "${e##*:}"
    done
    bench_table
    {
        echo "== nvidia-smi after"
        timeout -k 2 20 nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv 2>&1
    } >> "$OUT/env.txt"
    local files
    files=$(find "$OUT" -maxdepth 1 -type f | wc -l)
    log "gpu-check done in $(elapsed)s; $files files in $OUT; $FAILS step(s) failed or timed out"
    echo "---- summary"
    cat "$OUT/summary.txt"
    echo "---- bench"
    cat "$OUT/bench.txt" 2>/dev/null
    echo "---- failures in gpu_report.tsv"
    [ -f "$OUT/gpu_report.tsv" ] && awk -F'\t' 'NR > 1 && $8 != "ok" && $8 !~ /^ok:/' "$OUT/gpu_report.tsv" | head -40
    [ "$FAILS" -eq 0 ]
}

# ---------------------------------------------------------------------------------------------
# tune (on the GPU machine, issue 13)

TUNE_S=${FP8FORGE_TUNE_S:-360}

# tune_step NAME LIMIT_S ARGS...: one `fp8forge autotune ... --json` under timeout -k 5, its JSON
# appended to tune.jsonl, its stderr to tune.log.
tune_step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - $(elapsed) - 30))
    if [ "$left" -lt 15 ]; then
        echo "=== [+$(elapsed)s] SKIP $name: budget" | tee -a "$OUT/tune.log"
        record "$name" 0 "skipped: no time"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== [+$(elapsed)s] $name (timeout ${limit}s): $BIN autotune $* --json" | tee -a "$OUT/tune.log"
    local t=$SECONDS json rc status
    json=$(timeout -k 5 "$limit" "$BIN" autotune "$@" --json 2>>"$OUT/tune.log")
    rc=$?
    [ -n "$json" ] && printf '%s\n' "$json" | tr -d '\n' >> "$OUT/tune.jsonl" && echo >> "$OUT/tune.jsonl"
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${limit}s (rerun: --resume continues)" ;;
        *) status="FAILED (exit $rc: $(tail -1 "$OUT/tune.log" | cut -c1-120))" ;;
    esac
    echo "=== [+$(elapsed)s] $name: $status" | tee -a "$OUT/tune.log"
    record "$name" $((SECONDS - t)) "$status"
}

ratios() {
    timeout -k 2 30 python3 - "$OUT/tune.jsonl" "$OUT/calibrate.json" > "$OUT/ratios.txt" 2>&1 <<'PY'
import json, sys
runs = []
for line in open(sys.argv[1]):
    line = line.strip()
    if line:
        try:
            runs.append(json.loads(line))
        except Exception as e:
            print(f"bad line: {e}")
pruned = [o for r in runs if r.get("summary", {}).get("mode") == "pruned" for o in r.get("outcomes", [])]
exh = [o for r in runs if r.get("summary", {}).get("mode") == "exhaustive" for o in r.get("outcomes", [])]
def med(v):
    v = sorted(v)
    return v[len(v) // 2] if v else float("nan")
def show(what, v, goal):
    if v:
        print(f"{what}: min {min(v):.3f} median {med(v):.3f} max {max(v):.3f} over {len(v)} ({goal})")
    else:
        print(f"{what}: no data")
show("pruned pick / exhaustive best (exhaustive runs)", [o["us"] / o["pruned_pick_us"] for o in exh if o.get("pruned_pick_us")], "goal >= 0.98")
show("share of candidates the pruned search times", [o["timed"] / o["candidates"] for o in pruned if o["candidates"]] + [o["pruned_timed"] / o["candidates"] for o in exh if o.get("pruned_timed")], "goal <= 0.15")
show("model top-1 / measured best", [o["us"] / o["model_pick_us"] for o in pruned + exh if o.get("model_pick_us")], "goal >= 0.90")
show("cuBLASLt best / chosen", [o["cublaslt_us"] / o["us"] for o in pruned + exh if o.get("cublaslt_us")], ">= 1.0 by construction")
print("entries cuBLASLt chose:", sum(1 for o in pruned if str(o["config"]).startswith("cublaslt_")), "of", len(pruned))
try:
    c = json.load(open(sys.argv[2]))["calibration"]
    print(f"simulate after calibration vs measured, median |sim/meas - 1| per entry: {c['simulate_error_after']:.3f} (before {c['simulate_error_before']:.3f}; goal <= 0.10)")
    print("calibrated parameters:", json.dumps(c["params"]))
except Exception as e:
    print(f"no calibration: {e}")
PY
}

tune() {
    mkdir -p "$OUT"
    : > "$OUT/summary.txt"
    : > "$OUT/tune.log"
    : > "$OUT/tune.jsonl"
    log "gpu-check tune $(date -u +%FT%TZ): budget ${BUDGET}s, tuner ${TUNE_S}s, output $OUT"
    for f in "$BIN" "$BUNDLE/kernel-cache.tar.xz"; do
        [ -e "$f" ] || { log "gpu-check: $f missing: run 'bash bench/gpu-check.sh prepare' and carry $BUNDLE"; exit 1; }
    done
    local t=$SECONDS
    environment > /dev/null
    export FP8FORGE_KERNEL_CACHE=${FP8FORGE_KERNEL_CACHE:-/tmp/fp8forge-kernel-cache}
    local key
    key=$(awk '$1 == "nvrtc_key" && $2 ~ /^[0-9]+\.[0-9]+$/ {print $2}' "$BUNDLE/MANIFEST" 2>/dev/null)
    [ -n "$key" ] && export FP8FORGE_KERNEL_CACHE_NVRTC=${FP8FORGE_KERNEL_CACHE_NVRTC:-$key}
    mkdir -p "$FP8FORGE_KERNEL_CACHE"
    timeout -k 5 60 tar -xJf "$BUNDLE/kernel-cache.tar.xz" -C "$FP8FORGE_KERNEL_CACHE" 2>>"$OUT/tune.log" ||
        log "gpu-check: the kernel cache did not unpack: kernels will be compiled here"
    rm -f "$OUT/env.txt"
    record environment $((SECONDS - t)) ok
    local table=$OUT/table.yaml nk shapes="" start left
    for nk in $BENCH_NK; do shapes="$shapes --shape $nk"; done
    # Dense shapes at M 64, 128, 4096 (two thirds of the tuner's time), then the grouped ones in
    # what is left of it; --resume continues a step that timed out, in this call or the next.
    start=$(elapsed)
    # shellcheck disable=SC2086
    tune_step "tune dense M=64,128,4096" $((TUNE_S * 2 / 3)) $shapes --m 64,128,4096 --out "$table" --resume --quiet
    left=$((TUNE_S - ($(elapsed) - start)))
    [ "$left" -lt 30 ] && left=30
    tune_step "tune grouped E=4 M=8192" $((left / 2)) --shape 4096x7168x4 --shape 7168x2048x4 --m 8192 --out "$table" --resume --quiet
    tune_step "tune grouped E=8 M=4096" $((left / 2)) --shape 4096x7168x8 --shape 7168x2048x8 --m 4096 --out "$table" --resume --quiet
    local t2=$SECONDS
    echo "=== [+$(elapsed)s] calibrate: $BIN autotune --calibrate $table --json" | tee -a "$OUT/tune.log"
    timeout -k 5 60 "$BIN" autotune --calibrate "$table" --json > "$OUT/calibrate.json" 2>>"$OUT/tune.log"
    record calibrate $((SECONDS - t2)) "exit $?"
    # shellcheck disable=SC2086
    tune_step "exhaustive dense M=64" 600 $shapes --m 64 --exhaustive --out "$OUT/exhaustive.yaml" --resume --quiet
    ratios
    local files
    files=$(find "$OUT" -maxdepth 1 -type f | wc -l)
    log "gpu-check tune done in $(elapsed)s; $files files in $OUT; $FAILS step(s) failed or timed out"
    cat "$OUT/summary.txt"
    echo "---- ratios"
    cat "$OUT/ratios.txt"
    [ "$FAILS" -eq 0 ]
}

main() {
    case "$MODE" in
        prepare) prepare ;;
        run) run ;;
        tune) tune ;;
        size-check) size_check ;;
        *) usage ;;
    esac
}

# One line, so that bash has read all of it before running (the file may be edited meanwhile).
main "$@"; exit $?
