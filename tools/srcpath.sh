#!/usr/bin/env bash
# Run from source on the GPU machines (no install): puts every packages/*/src on PYTHONPATH.
#   source tools/srcpath.sh && python tools/bench_dilated.py
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
for _src in "$_root"/packages/*/src; do PYTHONPATH="$_src${PYTHONPATH:+:$PYTHONPATH}"; done
export PYTHONPATH
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset _root _src
