#!/usr/bin/env bash
# The GPU call that measures CUDA graphs (--cuda-graphs, 0.14.0), in about 5 minutes of device time:
#   1. tests/test_graphs.py and tests/test_cuda.py on CUDA: graphs give the eager bits (engine, runs of
#      files in fp32 and bf16, strict and protect's settings), and a replay never waits for the device;
#   2. trace_e2e.py without and with --cuda-graphs, alternating (2048 PNGs of 32x32, ResNet-20, batch 256,
#      --io processes, 4 workers, 2 batches queued): the pipeline's share of the engine's rate, and the
#      host's time to queue each batch;
#   3. bench_protect.py's end-to-end part with --cuda-graphs (the engine alone, Protector.run with threads
#      and processes, and the `preempt protect` command).
#
# Usage, from the repository root:  bash benchmarks/gpu_graphs.sh OUT_DIR [SHARED_COPY]
# (SHARED_COPY as for gpu_check.sh: a copy of ../shared, linked as ../shared where the machine has none.)
# Knobs: DEVICE (cuda), FILES (2048), WORKERS (4: trace_e2e's I/O workers; 8 is protect's default on 16 CPUs),
# PAIRS (2: trace runs without/with graphs), PACK (a .tgz outside OUT_DIR to pack it into: see gpu_env.sh), TEST_TIMEOUT (150 s),
# TRACE_TIMEOUT (75 s each), BENCH_TIMEOUT (150 s), E2E_IMAGES (2048), SKIP_TESTS, SKIP_BENCH. All of it
# takes about 8 minutes on an H100, more than one call may run (600 s): split it in two calls, e.g.
#   PAIRS=1 SKIP_BENCH=1 bash benchmarks/gpu_graphs.sh "$OUT" .devslim      (tests, one pair: ~5 min)
#   SKIP_TESTS=1 PAIRS=1 bash benchmarks/gpu_graphs.sh "$OUT" .devslim      (one pair, the bench: ~4 min)
set -u -o pipefail
case "${1:-}" in  # the header is the help; an option is never an output folder
    -h|--help) sed -n '2,/^set -u/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "$(basename "$0"): unknown option ${1} (usage: the header of $0, or --help)" >&2; exit 2 ;;
esac
OUT=${1:?usage: gpu_graphs.sh OUT_DIR [SHARED_COPY]}
SHARED_COPY=${2:-}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
. "$(dirname "$0")/gpu_env.sh"
LOG="$OUT/log.txt"
T0=$(date +%s)
WORST=0  # the exit status: the worst of the steps'
say() { echo "[t=$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
step() { say "$1: exit $2"; [ "$2" -gt "$WORST" ] && WORST=$2; pack; }

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
    nproc
} 2>&1 | tee "$OUT/machine.txt"
pack

if [ -z "${SKIP_TESTS:-}" ]; then
    say "tests on $DEVICE: tests/test_graphs.py tests/test_cuda.py"
    PREEMPT_TEST_DEVICE=$DEVICE timeout "${TEST_TIMEOUT:-150}" "$PY" -m pytest -q -p no:cacheprovider -rfEs \
        --durations=8 tests/test_graphs.py tests/test_cuda.py 2>&1 | tee "$OUT/pytest.log" | tail -25
    step tests "${PIPESTATUS[0]}"
fi

for pair in $(seq 1 "${PAIRS:-2}"); do
    for graphs in "" "--cuda-graphs"; do
        name="trace${graphs:+-graphs}-$pair"
        say "trace_e2e ${graphs:-(eager)} ($pair)"
        # shellcheck disable=SC2086
        timeout "${TRACE_TIMEOUT:-75}" "$PY" benchmarks/trace_e2e.py --device "$DEVICE" --files "${FILES:-2048}" \
            --batch-size 256 --workers "${WORKERS:-4}" --queued 2 --gil-duty= --repeats 3 $graphs --json-out "$OUT/$name.json" \
            2>>"$OUT/trace.err" | grep -v '^{' | tee -a "$LOG"
        step "$name" "${PIPESTATUS[0]}"
    done
done

[ -n "${SKIP_BENCH:-}" ] && exit "$WORST"
say "bench_protect end to end with --cuda-graphs"
timeout "${BENCH_TIMEOUT:-150}" "$PY" benchmarks/bench_protect.py --device "$DEVICE" --backbones resnet20 \
    --skip-reference --skip-bilevel --skip-photos --no-bf16 --batch-sweep=, --compile-modes=, --accuracy-images 0 \
    --images 512 --e2e-images "${E2E_IMAGES:-2048}" --cuda-graphs --json-out "$OUT/bench_e2e_graphs.json" \
    2>>"$OUT/bench.err" | tee -a "$LOG" | tail -30
step bench "${PIPESTATUS[0]}"
exit "$WORST"
