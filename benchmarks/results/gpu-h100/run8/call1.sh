#!/usr/bin/env bash
# Session 19's GPU call (preempt 0.18.0): gpu_graphs.sh's two calls in one, by priority, under one deadline.
#   1. tests/test_graphs.py and tests/test_cuda.py on CUDA;
#   2. trace_e2e without and with --cuda-graphs, two pairs (the criterion of RESULTS.md "CUDA graphs");
#   3. bench_protect's end-to-end part with --cuda-graphs;
#   4. the device-aware test files on CUDA, in the time left.
# Everything lands in /tmp/o and is packed into $OUT/run.tgz after each step ($OUT takes 8 files at most).
set -u -o pipefail
DEV=${DEV:-cuda}; PY=${PY:-python3}; N=${N:-2048}; BUDGET=${BUDGET:-440}
O=/tmp/o; rm -rf "$O"; mkdir -p "$O" "$OUT"
[ -e ../shared ] || ln -s "$(realpath .devslim)" ../shared
export PYTHONPATH=$PWD/src:$(realpath .devslim/site) PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
L=$OUT/log.txt; T0=$(date +%s)
el(){ echo "[t=$(( $(date +%s) - T0 ))s] $*" | tee -a "$L"; }
left(){ local l=$(( T0 + BUDGET - $(date +%s) )); [ "$l" -gt "$1" ] && l=$1; echo $(( l < 1 ? 1 : l )); }
pack(){ tar czf "$OUT/run.tgz" -C "$O" . 2>/dev/null; }
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, timm, typer, rich, PIL, huggingface_hub as h, safetensors as s; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'typer', typer.__version__, 'pillow', PIL.__version__, 'hub', h.__version__, 'safetensors', s.__version__); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')" 2>&1
  nproc; } | tee "$O/machine.txt" >>"$L"
el "1: tests on $DEV: test_graphs.py test_cuda.py"
PREEMPT_TEST_DEVICE=$DEV timeout "$(left ${T1:-130})" $PY -m pytest -q -p no:cacheprovider -rfEs --durations=8 \
  tests/test_graphs.py tests/test_cuda.py >"$O/pytest-cuda.log" 2>&1; el "tests exit $?"
tail -14 "$O/pytest-cuda.log" | tee -a "$L"; pack
for pair in 1 2; do
  for graphs in "" "--cuda-graphs"; do
    name="trace${graphs:+-graphs}-$pair"; el "2: $name"
    # shellcheck disable=SC2086
    timeout "$(left ${T2:-75})" $PY benchmarks/trace_e2e.py --device "$DEV" --files "$N" --batch-size 256 --workers 4 \
      --queued 2 --gil-duty= --repeats 3 $graphs --json-out "$O/$name.json" 2>>"$O/trace.err" | grep -v '^{' >>"$L"
    el "$name exit ${PIPESTATUS[0]}"; pack
  done
done
el "3: bench_protect end to end with --cuda-graphs"
timeout "$(left ${T3:-120})" $PY benchmarks/bench_protect.py --device "$DEV" --backbones resnet20 --skip-reference \
  --skip-bilevel --skip-photos --no-bf16 --batch-sweep=, --compile-modes=, --accuracy-images 0 --images 512 \
  --e2e-images "$N" --cuda-graphs --json-out "$O/bench_e2e_graphs.json" 2>>"$O/bench.err" | grep -v '^{' >>"$L"
el "bench exit ${PIPESTATUS[0]}"; pack
el "4: device-aware tests on $DEV in the time left"
PREEMPT_TEST_DEVICE=$DEV timeout "$(left 400)" $PY -m pytest -q -p no:cacheprovider -rfEs --durations=8 --maxfail=20 \
  tests/test_api.py tests/test_attacks.py tests/test_engine.py tests/test_eval.py tests/test_revert.py \
  tests/test_protect_real.py tests/test_reruns.py tests/test_eval_inputs.py tests/test_cli.py >"$O/pytest-wide.log" 2>&1; el "wide tests exit $?"
tail -14 "$O/pytest-wide.log" | tee -a "$L"; pack
el "done"
