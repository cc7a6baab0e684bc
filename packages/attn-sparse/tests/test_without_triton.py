"""Without Triton: the kernels' launch planning (plain torch) imports and runs, the launchers raise
ImportError naming triton, and the block primitive (attn_sparse.blocks) says why it takes the
reference path.

Each test's subprocess hides triton (``sys.modules["triton"] = None``: importing it raises, and
``importlib.util.find_spec`` reports it absent), then plans a backward for a real layout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

HIDDEN_TRITON = textwrap.dedent(
    """
    import sys
    sys.modules["triton"] = None  # import triton -> ModuleNotFoundError; find_spec -> None
    """
)


def run_without_triton(body: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, "-c", HIDDEN_TRITON + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_planning_imports_and_plans_without_triton() -> None:
    result = run_without_triton(
        """
        import torch
        from attn_sparse import patterns
        from attn_sparse.kernels import planning
        from attn_sparse.kernels import CSR, default_config, stored_ds_chunks

        layout = patterns.local_window(256, 64, block_size=(32, 32))
        csr = CSR.from_layout(layout)
        cfg = default_config(layout.block_size)
        assert cfg.check(layout.block_size) == []
        chunks = stored_ds_chunks(csr, 2, 2, 2, 2, cfg)
        assert len(chunks) == 1 and chunks[0].u1 == 4, chunks
        table = csr.row_table(2, 4)
        assert table.shape == (2 * 4 * layout.num_query_blocks, 3)
        slots = csr.transposed_slots()
        assert sorted(slots.tolist()) == list(range(layout.nnz))
        assert sys.modules["triton"] is None  # nothing managed to import it
        assert planning.launch_order is not None
        print("planned")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "planned"


def test_launchers_without_triton_raise_import_error_naming_it() -> None:
    result = run_without_triton(
        """
        try:
            from attn_sparse.kernels import block_sparse_forward
        except ImportError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "block_sparse_forward needs triton" in result.stdout


def test_block_primitive_explains_the_reference_path_without_triton() -> None:
    result = run_without_triton(
        """
        import torch
        from attn_sparse import BlockLayout, block_backend, block_forward

        layout = BlockLayout.from_dense(torch.ones(1, 2, 2, dtype=torch.bool), block_size=16)
        q = torch.randn(1, 32, 2, 16)
        choice = block_backend(q, layout)
        assert choice.backend == "reference", choice
        print(choice.rejected["triton"][0])
        out, lse = block_forward(q, q, q, layout)
        assert out.shape == q.shape and lse.shape == (1, 2, 32)
        try:
            block_forward(q, q, q, layout, backend="triton")
        except ValueError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("triton is not installed"), lines
    assert lines[1].startswith("backend 'triton' cannot take this input: triton is not installed"), lines
