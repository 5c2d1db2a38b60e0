#!/usr/bin/env bash
# The next GPU call (benchmarks/RESULTS.md, in the section of 0.21.0), prepared to run once, in one command: about
# 3-4 minutes on an H100 after the machine's start, never more than BUDGET (480 s).
#   0. the machine, and every piece the steps need: python3 with torch (and CUDA where DEVICE is cuda),
#      pytest, preempt_cli from src/, ../shared (linked from SHARED_COPY) with the CIFAR-10 test PNGs and
#      the pgdat-a ResNet-20. A missing piece stops the call at once, naming it (a test that cannot find
#      ../shared skips, and a skip would waste the call);
#   1. on DEVICE, tests/test_protect_real.py -k alike (the same-shape check mended in 0.19.0) and the 8 checks of
#      tests/test_cuda.py of the paths changed since (hashed noise, content seeds, levels to floats, PGD's
#      per-image starts, the in-place outer step and blocked bounds): none of them has run on CUDA yet;
#   2. tests/test_cli.py -k "disk_full or cannot_take" on DEVICE: 0.20.0's full and read-only output folders;
#   3. gpu_graphs.sh with WORKERS I/O workers, neither its tests nor its bench: trace_e2e eager and with
#      --cuda-graphs, PAIRS pairs (FILES PNGs, ResNet-20, batch 256, --io processes, 2 batches queued);
#   4. bench_pipeline.py --engine-ms 0.39 --files PIPE_FILES --io processes --workers WORKERS (the stand-in
#      engine on the machine's CPUs: what the writes together reach with 8 workers on 16 CPUs).
# Each step runs under its own timeout, cut to what is left of BUDGET (a step that no longer fits is skipped,
# saying so). Everything lands in WORK and is packed into OUT_DIR/run.tgz after each step (a lent machine
# brings back at most 8 files); OUT_DIR/log.txt is the summary. Exit status: the worst of the steps'.
#
# Usage, from the repository root:  bash benchmarks/gpu_next.sh OUT_DIR [SHARED_COPY]
#   on a lent machine: the command `bash benchmarks/gpu_next.sh "$OUT" .devslim`, carrying .devslim (a copy
#   of ../shared: data/cifar10/test and models/cifar10_resnet20_pgdat_a.safetensors are all it needs), with
#   timeout_s 560
#   dry run on a CPU (a few minutes on 2 cores):
#     DEVICE=cpu FILES=32 PIPE_FILES=256 bash benchmarks/gpu_next.sh /tmp/next-out .devslim
# Knobs: DEVICE (cuda), PY (python3), BUDGET (480 s), FILES (2048), PIPE_FILES (2048), WORKERS (8), PAIRS (2),
# WORK (/tmp/gpu-next: emptied first; not inside OUT_DIR).
set -u -o pipefail
case "${1:-}" in  # the header is the help; an option is never an output folder
    -h|--help) sed -n '2,/^set -u/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "$(basename "$0"): unknown option ${1} (usage: the header of $0, or --help)" >&2; exit 2 ;;
esac
FINAL=${1:?usage: gpu_next.sh OUT_DIR [SHARED_COPY]}
SHARED_COPY=${2:-}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
BUDGET=${BUDGET:-480}
FILES=${FILES:-2048}
PIPE_FILES=${PIPE_FILES:-2048}
WORKERS=${WORKERS:-8}
PAIRS=${PAIRS:-2}
WORK=${WORK:-/tmp/gpu-next}
mkdir -p "$FINAL"
FINAL=$(realpath "$FINAL")
case "$(realpath -m "$WORK")/" in "$FINAL"/*)
    echo "gpu_next.sh: WORK ($WORK) must not lie inside OUT_DIR ($FINAL): it is packed into OUT_DIR/run.tgz" >&2
    exit 2 ;;
esac
rm -rf "$WORK"
OUT=$WORK  # gpu_env.sh makes it, links SHARED_COPY as ../shared, sets PYTHONPATH=src(+site) and HF_HUB_OFFLINE
. "$(dirname "$0")/gpu_env.sh"
WORK=$(realpath "$WORK")
LOG="$FINAL/log.txt"
: >"$LOG"
T0=$(date +%s)
WORST=0
say() { echo "[t=$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
pack() { tar czf "$FINAL/run.tgz.part" -C "$WORK" . && mv -f "$FINAL/run.tgz.part" "$FINAL/run.tgz"; }
# left CAP RESERVE MIN: seconds for a step, at most CAP, keeping RESERVE of BUDGET for the steps after it, but
# never less than MIN where that much is left (the steps come in order of priority)
left() {
    local all=$(( T0 + BUDGET - $(date +%s) ))
    local l=$(( all - $2 ))
    [ "$l" -lt "$3" ] && l=$(( all < $3 ? all : $3 ))
    [ "$l" -gt "$1" ] && l=$1
    echo "$l"
}
done_step() {  # name exit-status
    say "$1: exit $2"
    [ "$2" -gt "$WORST" ] && WORST=$2
    pack
    return 0
}
fits() {  # name seconds minimum: whether the step still fits; if not, says so and counts it as timed out
    if [ "$2" -lt "$3" ]; then
        say "$1: skipped, $2 s of the budget left for it (needs $3)"
        WORST=124
        return 1
    fi
}
pytest_step() {  # name seconds pytest-arguments...: fails where nothing ran (all skipped or deselected)
    local name=$1 seconds=$2
    shift 2
    say "$name on $DEVICE: pytest $* (at most $seconds s)"
    PREEMPT_TEST_DEVICE=$DEVICE timeout "$seconds" "$PY" -m pytest -q -p no:cacheprovider -rfEs --durations=5 "$@" \
        >"$WORK/$name.log" 2>&1
    local rc=$?
    tail -4 "$WORK/$name.log" | cut -c1-400 | tee -a "$LOG"
    if [ "$rc" -eq 0 ] && ! tail -1 "$WORK/$name.log" | grep -q " passed"; then
        say "$name: no test passed (skipped?)"
        rc=5
    fi
    done_step "$name" "$rc"
}

say "0: the machine and the pieces the steps need (DEVICE=$DEVICE, BUDGET=$BUDGET s)"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
    nproc
    git log --oneline -1 2>/dev/null || true
} >"$WORK/machine.txt" 2>&1
DEVICE=$DEVICE timeout 120 "$PY" - >>"$WORK/machine.txt" 2>&1 <<'EOF'
import os, sys
from pathlib import Path

problems = []
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "python", sys.version.split()[0], sys.executable)
    if os.environ["DEVICE"].startswith("cuda"):
        if torch.cuda.is_available():
            print(torch.cuda.get_device_name(0))
        else:
            problems.append("DEVICE is cuda but torch.cuda.is_available() is False")
except Exception as err:
    problems.append(f"torch does not import: {err!r}")
from importlib.metadata import version
for name, dist in (("pytest", "pytest"), ("timm", "timm"), ("typer", "typer"), ("rich", "rich"), ("PIL", "pillow"),
                   ("safetensors", "safetensors"), ("huggingface_hub", "huggingface_hub"), ("numpy", "numpy")):
    try:
        __import__(name)
        print(dist, version(dist))
    except Exception as err:
        problems.append(f"{name} does not import: {err!r}")
src = Path("src").resolve()
try:
    import preempt_cli.protect
    where = Path(preempt_cli.protect.__file__).resolve()
    print("preempt_cli", where.parent)
    if src not in where.parents:
        problems.append(f"preempt_cli comes from {where.parent}, not from {src}")
except Exception as err:
    problems.append(f"preempt_cli does not import from {src}: {err!r}")
shared = Path("..", "shared")
cifar = shared / "data" / "cifar10" / "test"
count = len(list(cifar.glob("*/*.png")))
cats = len(list((cifar / "cat").glob("*.png")))
print(f"{shared.resolve()}: {count} CIFAR-10 test PNGs ({cats} cats)")
if count < 932 or cats < 15:
    problems.append(f"{cifar} holds {count} PNGs ({cats} cats): the steps need the 932 of the shared copy")
model = shared / "models" / "cifar10_resnet20_pgdat_a.safetensors"
if not model.is_file():
    problems.append(f"{model} is missing")
for problem in problems:
    print("MISSING:", problem)
sys.exit(3 if problems else 0)
EOF
rc=$?
cat "$WORK/machine.txt" | tee -a "$LOG"
if [ "$rc" -ne 0 ]; then
    say "0: a piece is missing (exit $rc): nothing run. SHARED_COPY=${SHARED_COPY:-(none)}; ../shared -> $(readlink ../shared || echo none)"
    pack
    exit 3
fi
pack

s=$(left 120 300 30)
fits "1-alike" "$s" 30 && pytest_step 1-alike "$s" tests/test_protect_real.py tests/test_cuda.py \
    -k "alike or same_bits_on_cuda or on_cuda_are or cpu_s_floats or cpu_s_bits or any_bound_blocks"
s=$(left 120 270 30)
fits "2-cli" "$s" 30 && pytest_step 2-cli "$s" tests/test_cli.py -k "disk_full or cannot_take"

s=$(left 400 75 60)
if fits "3-traces" "$s" 60; then
    # each trace gets an equal share of the step, at most 90 s (about 30 s each on an H100 in 0.19.0)
    per=$(( s / (2 * PAIRS) )); [ "$per" -gt 90 ] && per=90
    say "3-traces: gpu_graphs.sh, $WORKERS workers, $PAIRS pairs of $FILES PNGs (at most $per s each)"
    DEVICE=$DEVICE PY=$PY FILES=$FILES WORKERS=$WORKERS PAIRS=$PAIRS TRACE_TIMEOUT=$per SKIP_TESTS=1 SKIP_BENCH=1 \
        timeout "$s" bash "$(dirname "$0")/gpu_graphs.sh" "$WORK/graphs" "$SHARED_COPY" 2>&1 \
        | grep -v '^{' | cut -c1-700 | tee -a "$LOG"
    done_step 3-traces "${PIPESTATUS[0]}"
fi

s=$(left 120 0 30)
if fits "4-pipeline" "$s" 30; then
    say "4-pipeline: bench_pipeline.py, $PIPE_FILES files, --io processes, $WORKERS workers (at most $s s)"
    timeout "$s" "$PY" benchmarks/bench_pipeline.py --engine-ms 0.39 --files "$PIPE_FILES" --io processes \
        --workers "$WORKERS" --json-out "$WORK/pipeline.json" >"$WORK/pipeline.txt" 2>"$WORK/pipeline.err"
    rc=$?
    grep -v '^{' "$WORK/pipeline.txt" | tee -a "$LOG"
    tail -3 "$WORK/pipeline.err" | tee -a "$LOG"
    done_step 4-pipeline "$rc"
fi
cp "$LOG" "$WORK/log.txt"
pack
say "done: exit $WORST; $FINAL/run.tgz holds every step's files"
exit "$WORST"
