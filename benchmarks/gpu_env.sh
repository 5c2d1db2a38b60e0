# Sourced by the GPU scripts (gpu_check.sh, gpu_graphs.sh, gpu_next.sh) after they set OUT and SHARED_COPY: makes OUT,
# links SHARED_COPY as ../shared where the machine has none (a lent GPU machine gets only the repository),
# and runs from the source tree (nothing installed), with SHARED_COPY/site (pyautoattack), if any, on the path.
# PACK=FILE.tgz (outside OUT): the scripts' pack, after each step, puts all of OUT into it. A lent machine brings
# back 8 files at most from its $OUT, and gpu_check.sh writes 11, gpu_graphs.sh up to 10: there, give a scratch
# OUT and PACK=$OUT/run.tgz, e.g.  PACK=$OUT/run.tgz bash benchmarks/gpu_graphs.sh /tmp/graphs .devslim
mkdir -p "$OUT"
if [ -n "$SHARED_COPY" ] && [ ! -d "$SHARED_COPY" ]; then  # a link to it would dangle, and stay on a warm machine
    echo "gpu_env.sh: SHARED_COPY '$SHARED_COPY' is not a folder here (name it in the call's carry); ../shared not linked" >&2
elif [ -n "$SHARED_COPY" ] && [ ! -e ../shared ]; then
    ln -sfn "$(realpath "$SHARED_COPY")" ../shared  # -f: replaces a dangling link an earlier call left
fi
SITE=""
if [ -n "$SHARED_COPY" ] && [ -d "$SHARED_COPY/site" ]; then SITE=":$(realpath "$SHARED_COPY/site")"; fi
export PYTHONPATH="$PWD/src$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
pack() {
    if [ -n "${PACK:-}" ]; then tar czf "$PACK.part" -C "$OUT" . && mv -f "$PACK.part" "$PACK"; fi
    return 0
}
