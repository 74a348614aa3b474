#!/usr/bin/env bash
# Installs NVRTC (and cuobjdump + nvdisasm, for the SASS check) from NVIDIA's PyPI wheels into a
# Python venv, so the kernels can be compiled for sm_90a on a machine without CUDA or a GPU.
# Prints one line to eval: the export of LD_LIBRARY_PATH (libnvrtc.so.13) and PATH (cuobjdump).
#
#   eval "$(kernels/ci/install_nvrtc.sh [VENV_DIR])"
#
# NVRTC is pinned to the 13.0 series, the compiler of the lent GPUs' CUDA 13.0 (driver 580), so
# the CI sees the register allocation the device will. The CUDA runtime wheel is not needed: the
# kernels include no CUDA header.
set -euo pipefail
VENV=${1:-${FP8FORGE_NVRTC_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fp8forge/nvrtc-venv}}
NVRTC_VERSION=13.0.88
TOOLS_VERSION=13.2.86
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" >&2
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    "nvidia-cuda-nvrtc==$NVRTC_VERSION" "nvidia-cuda-cuobjdump==$TOOLS_VERSION" "nvidia-cuda-nvdisasm==$TOOLS_VERSION" >&2
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
LIB="$SITE/nvidia/cu13/lib"
BIN="$SITE/nvidia/cu13/bin"
[ -e "$LIB/libnvrtc.so.13" ] || { echo "install_nvrtc.sh: $LIB/libnvrtc.so.13 missing after install" >&2; exit 1; }
echo "export LD_LIBRARY_PATH=\"$LIB\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\" PATH=\"$BIN:\$PATH\""
