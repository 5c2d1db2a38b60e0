#!/usr/bin/env bash
# Session 13's one GPU call: queued-batch criterion, end to end, PreAct18 fp32 compiled, tests on CUDA.
set -u -o pipefail
DEV=${DEV:-cuda}; N=${N:-2048}; NP=${NP:-512}; PY=${PY:-python3}
TESTS=${TESTS:-tests/test_cuda.py tests/test_engine.py tests/test_batches.py tests/test_protect_real.py tests/test_cli.py tests/test_eval.py tests/test_baselines.py tests/test_attacks.py tests/test_revert.py tests/test_reruns.py}
[ -e ../shared ] || ln -s "$(realpath .devslim)" ../shared
export PYTHONPATH=$PWD/src:$(realpath .devslim/site) PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
L=$OUT/log.txt; E=$OUT/err.txt; T0=$(date +%s)
el(){ echo "[t=$(( $(date +%s) - T0 ))s] $*" | tee -a "$L"; }
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, timm, typer, huggingface_hub as h; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'typer', typer.__version__, 'hub', h.__version__); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
  nproc; git log --oneline -1 2>/dev/null; } >>"$L" 2>&1
el "A: trace_e2e --queued 2,1"
timeout ${TA:-150} $PY benchmarks/trace_e2e.py --device $DEV --files $N --workers 4 --queued 2,1 --gil-duty= --repeats 3 \
  --json-out $OUT/trace.json 2>>"$E" | grep -v '^{' | tee -a "$L"; el "trace exit ${PIPESTATUS[0]}"
el "B: bench_protect end to end, resnet20"
timeout ${TB:-100} $PY benchmarks/bench_protect.py --device $DEV --backbones resnet20 --skip-reference --skip-bilevel \
  --skip-photos --no-bf16 --batch-sweep=, --compile-modes=, --accuracy-images 0 --images $N \
  --json-out $OUT/bench_e2e.json 2>>"$E" | tee -a "$L"; el "bench e2e exit ${PIPESTATUS[0]}"
el "C: preact18 fp32 compiled"
timeout ${TC:-120} $PY benchmarks/bench_protect.py --device $DEV --backbones dm-preact18 --images $NP --skip-reference \
  --skip-bilevel --skip-photos --skip-e2e --accuracy-images 0 --batch-sweep ${BS:-256} --compile-modes default \
  --compile-backbones dm-preact18 --compile-precisions fp32 --no-bf16 --json-out $OUT/bench_preact.json 2>>"$E" | tee -a "$L"
el "preact exit ${PIPESTATUS[0]}"
el "D: tests on $DEV"
PREEMPT_TEST_DEVICE=$DEV timeout ${TD:-170} $PY -m pytest -q -p no:cacheprovider -rfEs --durations=8 \
  --junitxml=$OUT/pytest.xml $TESTS >$OUT/pytest.log 2>&1; el "tests exit $?"
tail -15 $OUT/pytest.log | tee -a "$L"
