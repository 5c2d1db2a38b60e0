#!/usr/bin/env bash
# Everything a GPU session checks, in one run (device time is short; see benchmarks/RESULTS.md):
#   1. the device-aware part of the test suite on CUDA (PREEMPT_TEST_DEVICE=cuda) and tests/test_cuda.py;
#   2. benchmarks/bench_protect.py on CUDA (engine vs reference, batch/precision sweep, cudnn.benchmark,
#      torch.compile, bf16 accuracy check, photos, end to end, Bi-Level);
#   3. benchmarks/bench_pipeline.py (the file pipeline against a stand-in engine, on the machine's CPUs);
#   4. benchmarks/trace_e2e.py (where the end-to-end time goes; batches queued 2 at a time against 1).
#
# Usage, from the repository root:  bash benchmarks/gpu_check.sh OUT_DIR [SHARED_COPY]
#   OUT_DIR      where logs, the JUnit XML and the benchmark's JSON go
#   SHARED_COPY  a copy of ../shared to link as ../shared when the machine has none (a lent GPU machine
#                gets only the repository); its site/ folder, if any, goes on PYTHONPATH (pyautoattack)
# Runs from the source tree (PYTHONPATH=src): nothing is installed. Environment knobs, for a dry run on a
# CPU: DEVICE (cuda), TESTS (the test files), BENCH_ARGS (extra benchmark arguments), TEST_TIMEOUT (210 s),
# BENCH_TIMEOUT (330 s), PIPELINE_ARGS (bench_pipeline's arguments; "skip" for none), TRACE_ARGS
# (trace_e2e's arguments; "skip" for none), TRACE_TIMEOUT (240 s), PACK (a .tgz outside OUT_DIR to pack it into
# after each step: it writes 11 files, and a lent machine brings back 8; see gpu_env.sh). Its timeouts add up to
# 900 s, more than one call may run (600 s): on a lent machine, split it (TESTS, BENCH_ARGS, PIPELINE_ARGS=skip, ...).
set -u -o pipefail
case "${1:-}" in  # the header is the help; an option is never an output folder
    -h|--help) sed -n '2,/^set -u/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "$(basename "$0"): unknown option ${1} (usage: the header of $0, or --help)" >&2; exit 2 ;;
esac
OUT=${1:?usage: gpu_check.sh OUT_DIR [SHARED_COPY]}
SHARED_COPY=${2:-}
DEVICE=${DEVICE:-cuda}
TESTS=${TESTS:-tests/test_engine.py tests/test_cuda.py tests/test_graphs.py tests/test_batches.py tests/test_protect_real.py tests/test_cli.py tests/test_eval.py tests/test_baselines.py tests/test_attacks.py tests/test_revert.py tests/test_reruns.py}
. "$(dirname "$0")/gpu_env.sh"
PY=${PY:-python3}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
    "$PY" -c "import torch, timm, typer; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'typer', typer.__version__); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
    nproc
} 2>&1 | tee "$OUT/machine.txt"
pack

echo "== tests on $DEVICE: $TESTS"
start=$(date +%s)
# shellcheck disable=SC2086
PREEMPT_TEST_DEVICE=$DEVICE timeout "${TEST_TIMEOUT:-210}" "$PY" -m pytest -q -p no:cacheprovider -rfEs \
    --durations=12 --junitxml="$OUT/pytest-$DEVICE.xml" $TESTS 2>&1 | tee "$OUT/pytest-$DEVICE.log"
echo "tests: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s" | tee -a "$OUT/pytest-$DEVICE.log"
pack

echo "== bench_protect on $DEVICE"
start=$(date +%s)
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-330}" "$PY" benchmarks/bench_protect.py --device "$DEVICE" \
    --json-out "$OUT/bench_protect_$DEVICE.json" ${BENCH_ARGS:-} 2>"$OUT/bench_protect_$DEVICE.err" \
    | tee "$OUT/bench_protect_$DEVICE.txt"
echo "bench: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s" | tee -a "$OUT/bench_protect_$DEVICE.err"
tail -5 "$OUT/bench_protect_$DEVICE.err"
pack

if [ "${PIPELINE_ARGS:-}" != "skip" ]; then
    echo "== bench_pipeline (stand-in engine, this machine's CPUs)"
    # shellcheck disable=SC2086
    timeout 120 "$PY" benchmarks/bench_pipeline.py ${PIPELINE_ARGS:-} 2>"$OUT/bench_pipeline.err" \
        | tee "$OUT/bench_pipeline.txt"
    echo "pipeline: exit ${PIPESTATUS[0]}" | tee -a "$OUT/bench_pipeline.err"
    pack
fi

if [ "${TRACE_ARGS:-}" != "skip" ]; then
    echo "== trace_e2e on $DEVICE (where the end-to-end time goes; 2 batches queued against 1)"
    # shellcheck disable=SC2086
    timeout "${TRACE_TIMEOUT:-240}" "$PY" benchmarks/trace_e2e.py --device "$DEVICE" \
        ${TRACE_ARGS:---workers 4 --queued 2,1 --gil-duty 0.1} --json-out "$OUT/trace_e2e_$DEVICE.json" \
        2>"$OUT/trace_e2e_$DEVICE.err" | grep -v '^{' | tee "$OUT/trace_e2e_$DEVICE.txt"
    echo "trace: exit ${PIPESTATUS[0]}" | tee -a "$OUT/trace_e2e_$DEVICE.err"
    pack
fi
