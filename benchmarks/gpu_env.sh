# Sourced by the GPU scripts (gpu_check.sh, gpu_graphs.sh) after they set OUT and SHARED_COPY: makes OUT,
# links SHARED_COPY as ../shared where the machine has none (a lent GPU machine gets only the repository),
# and runs from the source tree (nothing installed), with SHARED_COPY/site (pyautoattack), if any, on the path.
mkdir -p "$OUT"
if [ -n "$SHARED_COPY" ] && [ ! -e ../shared ]; then
    ln -s "$(realpath "$SHARED_COPY")" ../shared
fi
SITE=""
if [ -n "$SHARED_COPY" ] && [ -d "$SHARED_COPY/site" ]; then SITE=":$(realpath "$SHARED_COPY/site")"; fi
export PYTHONPATH="$PWD/src$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
