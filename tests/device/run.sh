#!/usr/bin/env bash
# The device check's one command, from the repository root: on the GPU machine, and
# in `make device-check`'s dry run on the CPU. Offline: every package comes from the
# bundle (python -m tests.device.bundle); docs/models.md says what it checks.
#   BUNDLE  the bundle folder (var/device/bundle)
#   PYTHON  the Python to run (python3: 3.12 on the GPU machine)
#   REPORT  the JSON report ($OUT/device-check.json, else var/device/device-check.json)
#   EXTRA_LIB_PATH  folders with cuBLAS and the CUDA runtime, if not found below
# Arguments go to the check (--large: also an 8B-class model, on a GPU).
set -euo pipefail
BUNDLE=${BUNDLE:-var/device/bundle}
PYTHON=${PYTHON:-python3}
SITE=$(mktemp -d)/site
REPORT=${REPORT:-${OUT:-var/device}/device-check.json}
began=$(date +%s)
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target "$SITE" "$BUNDLE"/wheels/*.whl
tar -xJf "$BUNDLE/llama.tar.xz" -C "$SITE"
# cuBLAS and the CUDA runtime: NVIDIA's Python packages (nvidia/cu13/lib), else CUDA's
# own folder.
nvidia_libs=$("$PYTHON" -c '
import glob, sys
print(":".join(sorted({d for p in sys.path for d in glob.glob(p + "/nvidia/*/lib")})))')
export LD_LIBRARY_PATH="$SITE/llama_cpp/lib:${EXTRA_LIB_PATH:-}:${nvidia_libs}:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$SITE:$PWD"
echo "installed the bundle in $(($(date +%s) - began)) s"
exec "$PYTHON" -m tests.device.check --out "$REPORT" --bin "$SITE/bin" \
  --skeleton "$BUNDLE/smollm2.skeleton.gguf" "$@"
