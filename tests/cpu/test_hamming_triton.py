"""The Triton Hamming kernel: run by the Triton interpreter on the CPU (in a child process, since
TRITON_INTERPRET must be set before triton is imported and other tests may import it first), and
compiled ahead of time for sm_90 to show it lowers to real GPU code."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]

INTERPRETER_CHECK = textwrap.dedent(
    """
    import os
    assert os.environ["TRITON_INTERPRET"] == "1"
    import numpy as np
    import torch
    from cbir_engine.index.gpu import codes_to_words
    from cbir_engine.index.reference import knn_reference
    from cbir_engine.kernels.hamming import hamming_knn, interpreting

    assert interpreting()
    rng = np.random.default_rng(0)
    cases = 0
    for bits in (8, 64, 96, 256):
        for n in (1, 7, 59, 1023):
            db = rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)
            if n > 7:  # many ties: codes from a small pool
                db = db[rng.integers(0, max(2, n // 50), size=n)]
            q = np.concatenate([db[:1], rng.integers(0, 256, size=(6, bits // 8), dtype=np.uint8)])
            words = torch.from_numpy(codes_to_words(db))
            for k in sorted({1, min(5, n), n}):
                # Steps of 64 codes, 2 per program, chunks of 4 queries: several of each even when small.
                d, p = hamming_knn(torch.from_numpy(codes_to_words(q)), words.T.contiguous(), bits, k,
                                   query_chunk=4, block_n=64, chunks=2)
                rd, ri = knn_reference(db, np.arange(n, dtype=np.int64), q, k)
                np.testing.assert_array_equal(d.numpy(), rd)
                np.testing.assert_array_equal(p.numpy(), ri)
                cases += 1
    print("ok", cases)
    """
)


def test_triton_kernel_matches_reference_in_interpreter():
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    out = subprocess.run(
        [sys.executable, "-c", INTERPRETER_CHECK],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.split() == ["ok", "40"]


@pytest.mark.parametrize("bits", [64, 256])
def test_triton_kernels_compile_ahead_of_time_for_sm90(bits):
    import triton
    from triton.backends.compiler import GPUTarget

    from cbir_engine.kernels import hamming as hk

    if hk.interpreting():
        pytest.skip("TRITON_INTERPRET is set in this process")
    nbins, bq, bn, chunks = hk.tile_shape(bits)
    words = bits // 32
    tile = {"W": words, "BQ": bq, "BN": bn, "CHUNKS": chunks, "USE_POPC": True}
    kernels = [
        (
            hk.hamming_histogram_kernel,
            ["q_ptr", "db_ptr", "hist_ptr"],
            ["nq", "n"],
            {**tile, "NBINS": nbins},
        ),
        (
            hk.hamming_tile_counts_kernel,
            ["q_ptr", "db_ptr", "kth_ptr", "closer_ptr", "ties_ptr"],
            ["nq", "n", "ntiles"],
            tile,
        ),
        (
            hk.hamming_select_kernel,
            [
                "q_ptr",
                "db_ptr",
                "kth_ptr",
                "closer_total_ptr",
                "ties_wanted_ptr",
                "closer_off_ptr",
                "ties_off_ptr",
                "out_pos_ptr",
                "out_dist_ptr",
            ],
            ["nq", "n", "ntiles", "k"],
            tile,
        ),
    ]
    for fn, pointers, ints, constexprs in kernels:
        signature = {name: "*i32" for name in pointers}
        signature.update({name: "i32" for name in ints})
        signature.update({name: "constexpr" for name in constexprs})
        compiled = triton.compile(
            triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", 90, 32),
        )
        assert compiled.asm["cubin"], fn.__name__
        assert "popc.b32" in compiled.asm["ptx"], fn.__name__  # the hardware popcount, not the SWAR one
