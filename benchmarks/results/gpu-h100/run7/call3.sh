#!/usr/bin/env bash
# Session 13's third GPU call: does a larger batch keep the device fed end to end? trace_e2e at 512, 1024, 256 (q2).
set -u -o pipefail
DEV=${DEV:-cuda}; PY=${PY:-python3}
[ -e ../shared ] || ln -s "$(realpath .devslim)" ../shared
export PYTHONPATH=$PWD/src:$(realpath .devslim/site) PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
L=$OUT/log.txt; E=$OUT/err.txt; T0=$(date +%s)
el(){ echo "[t=$(( $(date +%s) - T0 ))s] $*" | tee -a "$L"; }
for b in ${BATCHES:-512 1024 256}; do
  el "trace_e2e --batch-size $b --queued 2"
  timeout ${TA:-48} $PY benchmarks/trace_e2e.py --device $DEV --files ${N:-2048} --batch-size $b --workers 4 --queued 2 \
    --gil-duty= --repeats 3 --json-out $OUT/trace_b$b.json 2>>"$E" | grep -v '^{' | tee -a "$L"; el "exit ${PIPESTATUS[0]}"
done
