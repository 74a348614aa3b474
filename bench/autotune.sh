#!/usr/bin/env bash
# The autotuner's acceptance on a GPU (issue 5), in two device calls:
#
#   bench/gemm.sh build            # here: release fp8forge -> target/release/fp8forge (carry it)
#   bench/autotune.sh exhaustive   # device: every legal config of the kernels issue's 22 shapes;
#                                  # prints, per shape, the pruned search's pick and the cost
#                                  # model's pick against the exhaustive best, re-timed side by side
#   bench/autotune.sh table        # device: the whole DeepSeek-V3 table (10 shapes x 13 M),
#                                  # pruned, with its wall time (goal: under 10 minutes)
#
# Goals: pruned pick >= 0.98 of the best while timing <= 15% of the candidates; the model's
# top-1 >= 0.90 of the best. Results (YAML, JSON, summary) go to $OUT or a temporary directory.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-exhaustive}
OUT=${OUT:-$(mktemp -d)}
BIN=${FP8FORGE_BIN:-target/release/fp8forge}
[ -x "$BIN" ] || { echo "autotune.sh: $BIN missing (run 'bench/gemm.sh build' here and carry it)" >&2; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu,power.draw --format=csv 2>&1 | tee -a "$OUT/gpu.txt"

summary() {
    python3 - "$@" <<'PY' | tee -a "$OUT/summary.txt"
import json, math, sys
outs = []
for f in sys.argv[1:]:
    try:
        outs += json.load(open(f))["outcomes"]
    except Exception as e:
        print(f"{f}: no JSON ({e})")
print("| problem | candidates | exhaustive best | us | pruned pick | of best | pruned timed | model top-1 | of best |")
print("|---|---|---|---|---|---|---|---|---|")
pr, mo = [], []
for o in outs:
    best = o["us"]
    p = best / o["pruned_pick_us"] if o.get("pruned_pick_us") else float("nan")
    m = best / o["model_pick_us"] if o.get("model_pick_us") else float("nan")
    budget = max(4, math.floor(0.15 * o["candidates"]))
    pr.append(p); mo.append(m)
    q = o["problem"]
    name = f"M={q['m']} {q['n']}x{q['k']}" + (f" x{q['experts']}" if q["experts"] > 1 else "")
    print(f"| {name} | {o['candidates']} | {o['config']} | {best:.1f} | {o.get('pruned_pick')} | {p:.3f} | {budget} ({100*budget/o['candidates']:.0f}%) | {o['model_pick']} | {m:.3f} |")
ok = [x for x in pr if x == x]
mk = [x for x in mo if x == x]
if ok:
    print(f"pruned pick: min {min(ok):.3f}, geomean {math.exp(sum(map(math.log, ok))/len(ok)):.3f} of the exhaustive best (goal >= 0.98)")
if mk:
    print(f"model top-1: min {min(mk):.3f}, geomean {math.exp(sum(map(math.log, mk))/len(mk)):.3f} of the exhaustive best (goal >= 0.90)")
PY
}

case "$MODE" in
exhaustive)
    rc=0
    run() { # NAME ARGS...
        local name=$1; shift
        "$BIN" autotune "$@" --exhaustive --json --out "$OUT/exhaustive.yaml" > "$OUT/$name.json" 2>> "$OUT/exhaustive.err" || rc=1
    }
    start=$(date +%s)
    run dense --shape 2112x7168 --shape 24576x1536 --shape 32768x512 --shape 7168x16384 --shape 4096x7168 \
        --shape 7168x2048 --m 64,128,4096
    run grouped4 --shape 4096x7168x4 --shape 7168x2048x4 --m 8192
    run grouped8 --shape 4096x7168x8 --shape 7168x2048x8 --m 4096
    echo "exhaustive: $(( $(date +%s) - start )) s, exit $rc (stderr in $OUT/exhaustive.err)" | tee -a "$OUT/summary.txt"
    summary "$OUT/dense.json" "$OUT/grouped4.json" "$OUT/grouped8.json"
    exit $rc ;;
table)
    cfg=$(mktemp -d)
    cat > "$cfg/config.json" <<'JSON'
{"model_type": "deepseek_v3", "hidden_size": 7168, "num_attention_heads": 128, "num_hidden_layers": 61,
 "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
 "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
 "first_k_dense_replace": 3, "vocab_size": 129280, "num_experts_per_tok": 8}
JSON
    start=$(date +%s)
    "$BIN" autotune --model "$cfg" --out "$OUT/deepseek_v3.yaml" --json > "$OUT/table.json" 2> "$OUT/table.err"
    rc=$?
    echo "DeepSeek-V3 table: $(( $(date +%s) - start )) s wall (goal < 600), exit $rc" | tee -a "$OUT/summary.txt"
    python3 - "$OUT/table.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
o = r["outcomes"]
share = max(x["timed"] / x["candidates"] for x in o)
print(f"{len(o)} problems, {sum(x['timed'] for x in o)} candidates timed, at most {100*share:.1f}% of a problem's")
PY
    exit $rc ;;
*) echo "usage: bench/autotune.sh exhaustive|table" >&2; exit 2 ;;
esac
