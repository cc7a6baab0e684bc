#!/usr/bin/env bash
# The tests that need a CUDA GPU (CI skips them), from source, with Triton compiling for the GPU:
#   bash tools/gpu_tests.sh            # on a GPU machine, from the repository root
# test_triton_kernel.py is left out: it runs the kernels on CPU tensors in Triton's interpreter.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/srcpath.sh"
export TRITON_INTERPRET=0
python -m pytest -q -p no:cacheprovider -rs \
  packages/attn-sparse/tests/test_cuda_graphs.py \
  packages/attn-sparse/tests/test_pattern_build.py \
  packages/attn-sparse/tests/test_token_masks_cuda.py \
  packages/attn-sparse/tests/test_sdpa_backend.py \
  packages/attn-core/tests/test_varlen.py \
  packages/attn-core/tests/test_strided_varlen.py \
  packages/attn-core/tests/test_packed_sdpa.py \
  packages/attn-core/tests/test_side_streams.py \
  packages/attn-core/tests/test_memo.py \
  packages/attn-core/tests/test_cuda_graphs_dilated.py \
  packages/attn-core/tests/test_sdpa_backend.py \
  packages/attn-core/tests/test_hostile_inputs_cuda.py \
  packages/memory-runtime/tests/test_fragmentation.py \
  packages/memory-runtime/tests/test_pinned.py \
  packages/memory-runtime/tests/test_pools.py \
  "$@"
