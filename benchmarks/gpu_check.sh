#!/usr/bin/env bash
# The GPU check of issue #6, as ONE command for a GPU machine (one run of at most 10 minutes):
# write a Llama-7B-shaped BF16 checkpoint (32 blocks, hidden 4096, ffn 11008, vocab 32000;
# 6.7e9 parameters, 13.5 GB in 3 shards) on the machine's disk with make_synthetic.py, then time
# `wwcli analyze --device cuda` on it end to end (goal: <= 30 s on one H200), check it against
# wwcli on the CPU (float64) for a few layers, time the bare GPU eigensolver work on the same
# shapes, and, with the time left, weightwatcher 0.7.7 on the same folder.
#
# On the device tool (the image has python3 with torch, numpy, scipy, typer, rich, safetensors,
# threadpoolctl, pandas, matplotlib, scikit-learn, tqdm; it lacks weightwatcher and powerlaw):
#
#   here, once:  mkdir -p benchmarks/out/gpu_site && cp -r .venv/lib/python3.11/site-packages/{weightwatcher,powerlaw.py} benchmarks/out/gpu_site/
#   run:         command "bash benchmarks/gpu_check.sh", carry ["benchmarks/out/gpu_site"], timeout_s 600
#
# Figures go to stdout and to $OUT (or benchmarks/out/gpu): summary.json, log.txt, and the
# per-layer results of wwcli on the GPU (wwcli_device_1.json), on the CPU for block 0
# (wwcli_cpu_subset.json) and of weightwatcher (weightwatcher.json). Environment knobs: MODEL_DIR
# (default /tmp/wwcli-llama7b, or benchmarks/out/wwcli-llama7b when /tmp has under 16 GB free; its
# path must not contain "safetensors", or weightwatcher ignores the index), PYTHON (default python3), WW_SITE
# (default benchmarks/out/gpu_site), BUDGET_S (default 570: the script gives weightwatcher what is
# left of it, and skips it under 60 s), PRESET (default llama7b) and DEVICE (default cuda); a
# smoke test on a machine without a GPU: PRESET=tiny DEVICE=cpu bash benchmarks/gpu_check.sh
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"
PRESET="${PRESET:-llama7b}"
DEVICE="${DEVICE:-cuda}"
if [ -z "${MODEL_DIR:-}" ]; then
    # /tmp unless it has under 16 GB free (a small tmpfs, say): then the repository's ignored out/.
    MODEL_DIR="/tmp/wwcli-$PRESET"
    FREE_KB=$(df --output=avail -k /tmp 2>/dev/null | tail -1 | tr -d ' ')
    if [ "$PRESET" = llama7b ] && [ "${FREE_KB:-0}" -lt 16000000 ]; then
        MODEL_DIR="$REPO/benchmarks/out/wwcli-$PRESET"
    fi
fi
WW_SITE="${WW_SITE:-$REPO/benchmarks/out/gpu_site}"
BUDGET_S="${BUDGET_S:-570}"
RESULTS="${OUT:-$REPO/benchmarks/out/gpu}"
mkdir -p "$RESULTS"
LOG="$RESULTS/log.txt"
: >"$LOG"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

say() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

# Runs "$@" and prints its wall seconds (stdout of the command goes to $TIMED_STDOUT, its stderr
# to the log); returns the command's exit status.
timed() {
    local start end status
    start=$(date +%s%N)
    "$@" >"${TIMED_STDOUT:-/dev/null}" 2>>"$LOG"
    status=$?
    end=$(date +%s%N)
    local ms=$(((end - start) / 1000000))
    printf "%d.%03d" $((ms / 1000)) $((ms % 1000))
    return $status
}

case "$MODEL_DIR" in
*safetensors*) say "MODEL_DIR $MODEL_DIR contains 'safetensors': weightwatcher would ignore the index"; exit 2 ;;
esac

say "machine"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
    nproc
    free -g | head -2
    df -h "$(dirname "$MODEL_DIR")" | tail -1
    "$PYTHON" -c "import sys, torch, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
} 2>&1 | tee -a "$LOG"
MACHINE="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
MACHINE="${MACHINE:-no GPU}, $(nproc) CPU cores"

say "wwcli imports? (the image's typer, rich, numpy, scipy, safetensors)"
"$PYTHON" -m wwcli --version 2>&1 | tee -a "$LOG" || { say "wwcli does not run here"; exit 2; }

say "write the $PRESET checkpoint to $MODEL_DIR"
if [ -f "$MODEL_DIR/model.safetensors.index.json" ]; then
    GEN_S="reused"
else
    GEN_S=$(TIMED_STDOUT="$RESULTS/generate.json" timed "$PYTHON" benchmarks/make_synthetic.py "$MODEL_DIR" \
        --preset "$PRESET" --shard-size 5GB --workers "$(nproc)") || { say "generation failed"; tail -20 "$LOG"; exit 2; }
fi
say "generation: $GEN_S s $(cat "$RESULTS/generate.json" 2>/dev/null)"
du -sh "$MODEL_DIR" | tee -a "$LOG"

say "the engine's CUDA tests (torch backend on the GPU)"
TESTS="$("$PYTHON" -m pytest -q -p no:cacheprovider tests/engine/test_esd.py tests/engine/test_speed_paths.py -k "torch or cuda or backend" 2>&1 | tail -3)"
echo "$TESTS" | tee -a "$LOG"

# One wwcli run: wall seconds (this shell), peak RSS (GNU time if present).
wwcli_run() { # name, then wwcli arguments
    local name="$1"
    shift
    local wall status rss=""
    local command=("$PYTHON" -m wwcli analyze "$MODEL_DIR" --format json -q --exit-zero "$@")
    if [ -x /usr/bin/time ]; then
        command=(/usr/bin/time -f "%M" -o "$RESULTS/$name.rss" "${command[@]}")
    fi
    wall=$(TIMED_STDOUT="$RESULTS/$name.json" timed "${command[@]}")
    status=$?
    rss=$(tail -1 "$RESULTS/$name.rss" 2>/dev/null)
    say "wwcli $* : ${wall} s, peak RSS ${rss:-?} KiB, exit $status"
    echo "\"$name\": {\"wall_s\": $wall, \"exit\": $status, \"peak_rss_kib\": \"${rss}\", \"args\": \"$*\"}," >>"$RESULTS/runs.part"
}
: >"$RESULTS/runs.part"

say "wwcli analyze --device $DEVICE (default --jobs = cores), run 1"
wwcli_run wwcli_device_1 --device "$DEVICE"

say "wwcli on the CPU (float64, numpy) for the layers of block 0 (ids 2-9), to check the GPU's numbers"
wwcli_run wwcli_cpu_subset --device cpu --layers 2-9

say "wwcli analyze --device $DEVICE --jobs 1 (one layer at a time: no overlap on the GPU)"
wwcli_run wwcli_device_jobs1 --device "$DEVICE" --jobs 1

say "wwcli analyze --device $DEVICE, run 2"
wwcli_run wwcli_device_2 --device "$DEVICE"

say "bare eigensolver work on $DEVICE: float64 Gram + eigvalsh of every matrix shape of the model"
"$PYTHON" - "$PRESET" "$DEVICE" >"$RESULTS/floor.json" 2>>"$LOG" <<'EOF'
import contextlib, json, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
import torch
sys.path.insert(0, "benchmarks")
from make_synthetic import PRESETS, plan_model

preset, device = sys.argv[1], sys.argv[2]
shapes = [p.shape for p in plan_model(mlp="gated", **PRESETS[preset]) if len(p.shape) == 2]
shapes = [s for s in shapes if max(s) <= 50000 and min(s) <= 15000]  # wwcli's default filter
cuda = device.startswith("cuda")

def sync():
    if cuda:
        torch.cuda.synchronize()

def solve(shape, stream=None):
    context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with torch.no_grad(), context:
        w = torch.randn(shape, device=device, dtype=torch.float32).to(torch.float64)
        gram = w.mT @ w if shape[0] >= shape[1] else w @ w.mT
        return torch.linalg.eigvalsh(gram).cpu()

solve(shapes[1]); sync()  # warm-up: CUDA context, cuSOLVER handle
start = time.perf_counter()
for shape in shapes:
    solve(shape)
sync()
sequential = time.perf_counter() - start
result = {"matrices": len(shapes), "sequential_s": sequential}
if cuda:
    streams = {}
    def on_own_stream(shape):
        key = threading.get_ident()
        streams.setdefault(key, torch.cuda.Stream(device=device))
        return solve(shape, streams[key])
    for threads in (4, 16):
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(on_own_stream, shapes))
        sync()
        result[f"threads_{threads}_s"] = time.perf_counter() - start
print(json.dumps(result))
EOF
say "floor: $(cat "$RESULTS/floor.json")"

say "compare: GPU run against the CPU subset, run 1 against run 2"
"$PYTHON" - "$RESULTS" >"$RESULTS/parity.json" 2>>"$LOG" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def layers(name):
    try:
        return {l["name"]: l for l in json.loads((out / f"{name}.json").read_text())["layers"]}
    except Exception as error:  # a run that failed
        return {}
gpu, cpu, gpu2, gpu_j1 = (layers(n) for n in ("wwcli_device_1", "wwcli_cpu_subset", "wwcli_device_2", "wwcli_device_jobs1"))
def worst(a, b, key):
    common = [n for n in a if n in b and a[n][key] is not None and b[n][key] is not None]
    return len(common), max((abs(a[n][key] - b[n][key]) / abs(b[n][key]) for n in common), default=None)
result = {
    "layers_gpu": len(gpu),
    "gpu_vs_cpu_alpha": worst(gpu, cpu, "alpha"),
    "gpu_vs_cpu_xmin": worst(gpu, cpu, "xmin"),
    "gpu_vs_cpu_lambda_max": worst(gpu, cpu, "lambda_max"),
    "run1_vs_run2_alpha": worst(gpu, gpu2, "alpha"),
    "jobs1_vs_default_identical": (out / "wwcli_device_1.json").read_bytes() == (out / "wwcli_device_jobs1.json").read_bytes() if gpu_j1 else None,
}
print(json.dumps(result))
EOF
say "parity: $(cat "$RESULTS/parity.json")"

LEFT=$((BUDGET_S - SECONDS - 20))
WW_STATUS="skipped"
WW_S="null"
if [ -d "$WW_SITE" ]; then export PYTHONPATH="$PYTHONPATH:$WW_SITE"; fi
if ! "$PYTHON" -c "import weightwatcher" >/dev/null 2>&1; then
    WW_STATUS="skipped: weightwatcher not importable (copy it and powerlaw.py to $WW_SITE and carry that folder)"
elif [ "$LEFT" -lt 60 ]; then
    WW_STATUS="skipped: only ${LEFT} s left"
else
    say "weightwatcher 0.7.7 on the same folder (its torch path; time limit ${LEFT} s)"
    WW_S=$(timed timeout "$LEFT" "$PYTHON" benchmarks/ww_child.py "$MODEL_DIR" "$RESULTS/weightwatcher.json")
    WW_EXIT=$?
    case $WW_EXIT in
    0) WW_STATUS="ran" ;;
    124) WW_STATUS="stopped after ${LEFT} s (not finished)" ;;
    *) WW_STATUS="failed with exit $WW_EXIT (see log.txt)" ;;
    esac
    say "weightwatcher: $WW_STATUS, ${WW_S} s"
fi
WW_COMPARE="null"
if [ "$WW_STATUS" = "ran" ]; then
    WW_COMPARE=$("$PYTHON" -c "
import json, sys
sys.path.insert(0, 'benchmarks')
from pathlib import Path
from bench_e2e import compare
print(json.dumps(compare(Path('$RESULTS/wwcli_device_1.json'), Path('$RESULTS/weightwatcher.json'))))" 2>>"$LOG")
fi

{
    echo "{"
    echo "\"machine\": \"$MACHINE\", \"preset\": \"$PRESET\", \"device\": \"$DEVICE\", \"model_dir\": \"$MODEL_DIR\","
    echo "\"generation_s\": \"$GEN_S\", \"engine_tests\": \"$(echo "$TESTS" | tail -1)\","
    cat "$RESULTS/runs.part"
    echo "\"floor\": $(cat "$RESULTS/floor.json" 2>/dev/null || echo null),"
    echo "\"parity\": $(cat "$RESULTS/parity.json" 2>/dev/null || echo null),"
    echo "\"weightwatcher\": {\"status\": \"$WW_STATUS\", \"wall_s\": ${WW_S:-null}, \"comparison\": ${WW_COMPARE:-null}},"
    echo "\"total_script_s\": $SECONDS"
    echo "}"
} >"$RESULTS/summary.json"
# The device tool brings back at most 8 files: keep the summary, the log and two result files.
rm -f "$RESULTS/runs.part" "$RESULTS"/*.rss "$RESULTS"/{floor,parity,generate}.json
rm -f "$RESULTS"/wwcli_device_2.json "$RESULTS"/wwcli_device_jobs1.json
say "summary ($RESULTS/summary.json):"
"$PYTHON" -m json.tool "$RESULTS/summary.json" 2>/dev/null || cat "$RESULTS/summary.json"
