#!/usr/bin/env bash
# Every CUDA path of this project, run once, on a machine that has only this repository and an NVIDIA GPU.
#
#   bash bench/gpu_check.sh              # finds or installs a CUDA build of requirements.txt's torch, then checks
#   bash bench/gpu_check.sh --dry-run    # the same steps on the CPU at tiny sizes, nothing installed
#                                        # (also PFGMPP_GPU_CHECK_DRY_RUN=1)
#   bash bench/gpu_check.sh --only=train_compile,samplers   # rerun some steps (bench/gpu_check.py lists them)
#
# Results: ${OUT:-bench-out}/gpu-check.json, one row per step, rewritten as each step ends (a run cut short keeps
# its finished rows), and bench-cuda.json from the speed benchmark; what the steps make goes to --work=DIR (default:
# a new temporary folder). The exit status is non-zero when any step
# failed, and the last line names the failed steps. The whole run is sized for 10 minutes (--budget, 540 s).
#
# Python: $PYTHON when set; else the first of python3's torch (when it is the pinned version and sees a GPU), a
# virtual environment at ${PFGMPP_GPU_CHECK_VENV:-/tmp/pfgmpp-gpu-venv} with requirements.txt installed (pip's
# default index serves CUDA builds of torch for Linux x86-64; wheels in .whl/ are used instead when present, for
# machines without network), or, when that install fails, python3's own CUDA torch with the mismatch recorded.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
DRY_RUN=${PFGMPP_GPU_CHECK_DRY_RUN:-0}
ARGS=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        *) ARGS+=("$arg") ;;
    esac
done
mkdir -p "$OUT"
PIN=$(sed -n 's/^torch==\([^[:space:];#]*\).*/\1/p' requirements.txt)
if [[ -z "$PIN" ]]; then
    echo "gpu_check: step install FAILED: requirements.txt has no torch==VERSION line" >&2
    exit 1
fi

# Prints "yes" when $1's torch is version $PIN with CUDA and a visible GPU.
cuda_torch_ok() {
    "$1" -c "import sys, torch; ok = torch.__version__.split('+')[0] == sys.argv[1] and torch.cuda.is_available()
print('yes' if ok else 'no')" "$PIN" 2>/dev/null || echo no
}

if [[ "$DRY_RUN" == 1 ]]; then
    PY=${PYTHON:-python3}
    NOTE="dry run: nothing installed, $PY used as it is"
    ARGS+=(--dry-run)
elif [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
    NOTE="PYTHON=$PYTHON given, nothing installed"
elif [[ "$(cuda_torch_ok python3)" == yes ]]; then
    PY=python3
    NOTE="python3 already has torch $PIN with CUDA"
else
    VENV=${PFGMPP_GPU_CHECK_VENV:-/tmp/pfgmpp-gpu-venv}
    PIP_SOURCE=()
    if compgen -G ".whl/*.whl" >/dev/null; then
        PIP_SOURCE=(--no-index --find-links .whl)
    fi
    echo "gpu_check: installing torch==$PIN and requirements.txt into $VENV"
    if { [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"; } \
        && "$VENV/bin/python" -m pip install --quiet --retries 1 --timeout 20 "${PIP_SOURCE[@]}" \
            -r requirements.txt \
        && [[ "$(cuda_torch_ok "$VENV/bin/python")" == yes ]]; then
        PY=$VENV/bin/python
        NOTE="installed torch $PIN and requirements.txt into $VENV"
    elif python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        PY=python3
        found=$(python3 -c "import torch; print(torch.__version__)")
        NOTE="install of torch $PIN failed (no network?); using python3's torch $found, NOT the pinned version"
        echo "gpu_check: WARNING: $NOTE" >&2
    else
        echo "gpu_check: step install FAILED: no CUDA build of torch $PIN could be installed into $VENV," \
             "and python3 has no CUDA torch" >&2
        exit 1
    fi
fi
if [[ "$DRY_RUN" != 1 ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
        || { echo "gpu_check: step nvidia-smi FAILED: no NVIDIA driver answers" >&2; exit 1; }
fi
echo "gpu_check: $NOTE"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PFGMPP_GPU_CHECK_INSTALL_NOTE=$NOTE
"$PY" -m bench.gpu_check --out="$OUT" "${ARGS[@]}"
