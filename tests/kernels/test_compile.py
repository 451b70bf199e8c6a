"""Every FFN kernel, with every autotune config and dtype, compiles for sm_80 and sm_90 and fits shared memory.

The interpreter accepts code the GPU compiler rejects (layouts, shared memory, dot shapes); this compiles the
same source for real targets without a GPU (see compile_worker.py).
"""

from __future__ import annotations

import pytest

from slimlm.kernels.ffn import TRITON_DTYPES

pytest.importorskip("triton")

# Shared memory per block a kernel may opt into: A100 (sm_80) 164 KiB, H100 (sm_90) 228 KiB (CUDA C Programming
# Guide, "Compute capabilities" table).
SHARED_LIMIT = {80: 164 * 1024, 90: 228 * 1024}


@pytest.mark.parametrize("arch", [80, 90])
def test_every_config_compiles_and_fits(compiled, arch):
    rows = [r for r in compiled if r["arch"] == arch]
    failed = [f"{r['kernel']} {r['dtype']} {r['config']}: {r['error']}" for r in rows if "error" in r]
    assert not failed, "compile failures:\n" + "\n".join(failed)
    too_big = [f"{r['kernel']} {r['dtype']} {r['config']}: {r['shared']} B" for r in rows
               if r["shared"] > SHARED_LIMIT[arch]]
    assert not too_big, f"over {SHARED_LIMIT[arch]} B of shared memory on sm_{arch}:\n" + "\n".join(too_big)
    print("\n".join(f"sm_{arch} {r['kernel']:16} {r['dtype']:8} {r['config']}: {r['shared']} B" for r in rows))


def test_all_kernels_and_dtypes_were_compiled(compiled):
    from slimlm.kernels import ffn_triton

    seen = {(r["arch"], r["kernel"], r["dtype"]) for r in compiled}
    want = {(a, k, str(d).removeprefix("torch.")) for a in (80, 90) for k in ffn_triton.KERNELS for d in TRITON_DTYPES}
    assert seen == want
    for name, (_, configs, _) in ffn_triton.KERNELS.items():
        n16 = sum(1 for r in compiled if r["arch"] == 90 and r["kernel"] == name and r["dtype"] == "float16")
        assert n16 == len(configs), f"{name}: {n16} of {len(configs)} configs compiled"
