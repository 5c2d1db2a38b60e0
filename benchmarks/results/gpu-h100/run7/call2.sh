#!/usr/bin/env bash
# Session 13's second GPU call: end to end (bench_protect), trace again (5 runs), PreAct18 fp32 compiled again, failed tests.
set -u -o pipefail
DEV=${DEV:-cuda}; PY=${PY:-python3}
[ -e ../shared ] || ln -s "$(realpath .devslim)" ../shared
export PYTHONPATH=$PWD/src:$(realpath .devslim/site) PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
L=$OUT/log.txt; E=$OUT/err.txt; T0=$(date +%s)
el(){ echo "[t=$(( $(date +%s) - T0 ))s] $*" | tee -a "$L"; }
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; nproc; } >>"$L" 2>&1
el "B: bench_protect end to end, resnet20, 2048 PNGs"
timeout ${TB:-110} $PY benchmarks/bench_protect.py --device $DEV --backbones resnet20 --skip-reference --skip-bilevel \
  --skip-photos --no-bf16 --batch-sweep=, --compile-modes=, --accuracy-images 0 --images ${NI:-512} --e2e-images ${N:-2048} \
  --json-out $OUT/bench_e2e.json 2>>"$E" | tee -a "$L"; el "bench e2e exit ${PIPESTATUS[0]}"
el "A: trace_e2e --queued 2,1, 5 runs"
timeout ${TA:-80} $PY benchmarks/trace_e2e.py --device $DEV --files ${N:-2048} --workers 4 --queued 2,1 --gil-duty= --repeats 5 \
  --json-out $OUT/trace.json 2>>"$E" | grep -v '^{' | tee -a "$L"; el "trace exit ${PIPESTATUS[0]}"
el "D: tests on $DEV"
PREEMPT_TEST_DEVICE=$DEV timeout ${TD:-110} $PY -m pytest -q -p no:cacheprovider -rfEs --durations=5 \
  --junitxml=$OUT/pytest.xml tests/test_protect_real.py tests/test_eval.py tests/test_cli.py -k "real or eval or sigterm or killed_run" \
  >$OUT/pytest.log 2>&1; el "tests exit $?"
tail -8 $OUT/pytest.log | tee -a "$L"
el "C: preact18 fp32 compiled, 5 runs"
timeout ${TC:-90} $PY benchmarks/bench_protect.py --device $DEV --backbones dm-preact18 --images ${NP:-512} --skip-reference \
  --skip-bilevel --skip-photos --skip-e2e --accuracy-images 0 --batch-sweep ${BS:-256} --compile-modes default --repeats 5 \
  --compile-backbones dm-preact18 --compile-precisions fp32 --no-bf16 --json-out $OUT/bench_preact.json 2>>"$E" | grep -v '^{' | tee -a "$L"
el "preact exit ${PIPESTATUS[0]}"
