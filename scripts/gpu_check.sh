#!/usr/bin/env bash
# The CUDA path on a real GPU, in one run of a few minutes:
#   info         device, torch and CUDA versions, nvidia-smi memory
#   cuda_tests   pytest -m cuda: each GNN layer, the BGRL step, the EMA update, checkpoints
#                across devices and `embed --device cuda`, all against the CPU
#   ddp_nccl     scripts/ddp_check.py under torchrun, one process per GPU (a world of one
#                with one GPU): identical targets, target_divergence 0
#   train_wK     scripts/bench_train.py --device cuda on a 1M-node synthetic store with K
#                sampling workers: BGRL seeds/s, the share of a step spent waiting for the
#                loader, the workers that would keep the GPU busy, peak GPU memory of a step
#   export       scripts/bench_export.py --device cuda --num-nodes 1000000: nodes/s, peak
#                GPU memory
#   cpu_tests    CPU tests that start several processes, and the choice of device, on this
#                GPU machine
# Every stage is time-boxed and logged; a failed stage does not stop the others. The last
# line printed is one JSON object with every stage's status and figures.
#
# Usage, from the repository root: bash scripts/gpu_check.sh
# Environment: PYTHON (default: .venv/bin/python, built with `make` if missing), OUT (logs
# go to $OUT/gpu-check; default: a new temporary directory), GPU_CHECK_BUDGET_S (seconds
# for all stages, default 450). Without a CUDA device the GPU stages are skipped and the
# cuda tests report their skip reason. Nothing is downloaded: the graphs are synthetic.
# To try the stages on a machine without a GPU: GPU_CHECK_DEVICE=cpu (gloo instead of NCCL,
# one process; no cpu_tests) and GPU_CHECK_NODES=20000 (graph size of the benchmarks).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$(pwd)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
NODES=${GPU_CHECK_NODES:-1000000}
RESERVE=15  # seconds kept for the summary

if [ -n "${OUT:-}" ]; then LOGS="$OUT/gpu-check"; else LOGS=$(mktemp -d -t gpu-check-XXXXXX); fi
mkdir -p "$LOGS/status"
WORK=$(mktemp -d -t gpu-check-work-XXXXXX)
trap 'rm -rf "$WORK"' EXIT

if [ -z "${PYTHON:-}" ]; then
    if [ ! -e .venv/.installed-stamp ]; then
        echo "== building .venv (make .venv/.installed-stamp)"
        make .venv/.installed-stamp > "$LOGS/make.log" 2>&1 || echo "make failed: see $LOGS/make.log"
    fi
    PYTHON=.venv/bin/python
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)  # the budget counts from here, after any set-up
echo "== logs in $LOGS"

elapsed() { echo $(( $(date +%s) - START )); }

# run_stage NAME LIMIT_S COMMAND...: run COMMAND with at most LIMIT_S seconds (less when the
# budget is nearly spent), output to $LOGS/NAME.log; status to $LOGS/status/NAME.
run_stage() {
    local name=$1 limit=$2
    shift 2
    local left=$(( BUDGET - RESERVE - $(elapsed) ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "skipped: out of time" > "$LOGS/status/$name"
        echo "== $name: skipped (out of time)"
        return 0
    fi
    echo "== $name (at most ${limit}s): $*"
    local began rc
    began=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - began ))
    if [ "$rc" -eq 0 ]; then
        echo "passed $took" > "$LOGS/status/$name"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "timeout $took" > "$LOGS/status/$name"
    else
        echo "failed $took rc=$rc" > "$LOGS/status/$name"
    fi
    echo "   $(cat "$LOGS/status/$name"); last lines of $LOGS/$name.log:"
    tail -n 8 "$LOGS/$name.log" | sed 's/^/   | /'
}

skip_stage() {
    echo "skipped: $2" > "$LOGS/status/$1"
    echo "== $1: skipped ($2)"
}

# ---- 1. the machine ------------------------------------------------------------------------
echo "== info"
"$PYTHON" - > "$LOGS/info.json" 2> "$LOGS/info.log" <<'EOF'
import json
import torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "gpus": 0, "device": "cpu"}
if torch.cuda.is_available():
    info["gpus"] = torch.cuda.device_count()
    info["device"] = torch.cuda.get_device_name(0)
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    free, total = torch.cuda.mem_get_info(0)
    info["gpu_mem_total_gb"], info["gpu_mem_free_gb"] = total / 2**30, free / 2**30
print(json.dumps(info))
EOF
if [ ! -s "$LOGS/info.json" ]; then
    echo '{"torch": null, "cuda": null, "cuda_available": false, "gpus": 0, "device": null}' \
        > "$LOGS/info.json"
    echo "torch did not import: see $LOGS/info.log"
fi
cat "$LOGS/info.json"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,memory.free \
        --format=csv 2>&1 | tee "$LOGS/nvidia-smi.log"
else
    echo "nvidia-smi: not found" | tee "$LOGS/nvidia-smi.log"
fi
GPUS=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["gpus"])' \
    "$LOGS/info.json" 2> /dev/null)
case $GPUS in '' | *[!0-9]*) GPUS=0 ;; esac

# ---- 2. the cuda tests ---------------------------------------------------------------------
run_stage cuda_tests 200 "$PYTHON" -m pytest -m cuda -q -rs -p no:cacheprovider \
    --junitxml="$LOGS/cuda-tests.xml" tests

if [ "$DEVICE" = cpu ]; then
    BACKEND=gloo NPROC=1
else
    BACKEND=nccl NPROC=$GPUS
fi
if [ "$DEVICE" = cuda ] && [ "$GPUS" -lt 1 ]; then
    for stage in ddp_nccl train_w1 train_w4 train_w8 export cpu_tests; do
        skip_stage "$stage" "no cuda device"
    done
else
    # ---- 3. DDP with NCCL ------------------------------------------------------------------
    run_stage ddp_nccl 120 bash -c '
        "$0" -m bgrl_dgl prepare synthetic --out "$1/ddp-store" --num-nodes 20000 \
            --avg-degree 10 --feat-dim 64 --num-classes 4 --feature-dtype float16 &&
        "$0" -m torch.distributed.run --standalone --nproc-per-node="$2" \
            scripts/ddp_check.py --data "$1/ddp-store" --out "$1/ddp-run" --steps 6 \
            --device "$3" --backend "$4"' \
        "$PYTHON" "$WORK" "$NPROC" "$DEVICE" "$BACKEND"

    # ---- 4. training speed and loader wait, 1M nodes -------------------------------------
    for workers in 1 4 8; do
        run_stage "train_w$workers" 120 "$PYTHON" scripts/bench_train.py --device "$DEVICE" \
            --num-nodes "$NODES" --num-workers "$workers" --warmup 5 --steps 30 --rounds 1
    done

    # ---- 5. export speed, 1M nodes ---------------------------------------------------------
    run_stage export 150 "$PYTHON" scripts/bench_export.py --device "$DEVICE" \
        --num-nodes "$NODES"

    # ---- the CPU tests that start several processes, on a machine with a GPU ---------------
    if [ "$DEVICE" = cpu ]; then
        skip_stage cpu_tests "GPU_CHECK_DEVICE=cpu"
    else
        # Two processes on one machine and two one-process nodes on loopback: on a machine
        # with GPUs these picked CUDA before the tests passed --device cpu.
        run_stage cpu_tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider \
            tests/unit/training/test_device.py \
            tests/distributed/test_distributed.py -k "test_device or two_processes_split or two_nodes"
    fi
fi

# ---- summary ---------------------------------------------------------------------------------
echo "== summary"
"$PYTHON" - "$LOGS" "$(elapsed)" <<'EOF' | tee "$LOGS/result.json"
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

logs, elapsed = Path(sys.argv[1]), int(sys.argv[2])
info = json.loads((logs / "info.json").read_text())


def status(name):
    path = logs / "status" / name
    if not path.exists():
        return {"status": "not run"}
    words = path.read_text().split()
    if words[0] == "skipped:":
        return {"status": "skipped", "reason": " ".join(words[1:])}
    entry = {"status": words[0], "seconds": int(words[1]), "log": str(logs / f"{name}.log")}
    if len(words) > 2:
        entry["exit"] = words[2]
    return entry


def last_json(name):
    """The last line of a stage's log that is a JSON object, if any."""
    path = logs / f"{name}.log"
    if not path.exists():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


stages = {name: status(name) for name in
          ("cuda_tests", "ddp_nccl", "train_w1", "train_w4", "train_w8", "export", "cpu_tests")}
tests = None
junit = logs / "cuda-tests.xml"
if junit.exists():
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    tests = {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
             "failed": counts["failures"], "errors": counts["errors"],
             "skipped": counts["skipped"]}

ddp = last_json("ddp_nccl")
trains = {name.removeprefix("train_w"): last_json(name) for name in stages
          if name.startswith("train_w")}
trains = {k: v for k, v in trains.items() if v}
export = last_json("export")
peaks = {f"train_w{k}": v.get("peak_gpu_mem_gb") for k, v in trains.items()}
if ddp:
    peaks["ddp_nccl"] = ddp.get("peak_gpu_mem_gb")
if export:
    peaks["export"] = export.get("peak_gpu_mem_gb")

ran = [s for s in stages.values() if s["status"] not in ("skipped", "not run")]
failed = [n for n, s in stages.items() if s["status"] in ("failed", "timeout")]
if failed:
    overall = "failed: " + ", ".join(failed)
elif not info.get("cuda_available"):
    overall = "no cuda device"
elif len(ran) < len(stages):
    overall = "incomplete"
else:
    overall = "ok"
print(json.dumps({
    "status": overall,
    "device": info.get("device"), "gpus": info.get("gpus"),
    "torch": info.get("torch"), "cuda": info.get("cuda"),
    "tests": tests,
    "ddp_nccl": None if ddp is None else {
        k: ddp.get(k) for k in ("backend", "world_size", "target_divergence",
                                "targets_identical", "logged_target_divergence")},
    "train_seeds_per_s": {k: v.get("bgrl_seeds_per_s") for k, v in trains.items()} or None,
    "loader_wait_share": {k: v.get("loader_wait_share") for k, v in trains.items()} or None,
    "workers_needed": {k: v.get("workers_needed") for k, v in trains.items()} or None,
    "train_ms": {k: v.get("bgrl_ms") for k, v in trains.items()} or None,
    "export_nodes_per_s": None if export is None else export.get("nodes_per_s"),
    "peak_gpu_mem_gb": peaks or None,
    "stages": stages,
    "elapsed_s": elapsed,
    "logs": str(logs),
}))
EOF
# Exit 0 when no stage failed or ran out of time.
! grep -qE '^(failed|timeout)' "$LOGS"/status/* 2> /dev/null
