"""The Triton kernels compile for sm_80 and sm_90 as their launchers configure them, without a GPU.

tests/triton_aot.py compiles every launch configuration the launchers produce (run in a subprocess
without TRITON_INTERPRET, since interpreted kernels cannot be compiled). The limits checked are those
that make a launch fail or crawl on the GPU: shared memory per block, and register spills of the
16-bit attention kernels on Hopper, whose query tiles of 64 rows or more must use wgmma.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory one block may use


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_within_limits(arch):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    script = os.path.join(os.path.dirname(__file__), "triton_aot.py")
    run = subprocess.run([sys.executable, script, "--arch", str(arch)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    launches = [json.loads(line) for line in run.stdout.splitlines()]
    assert {r["kernel"] for r in launches} == {
        "_tree_attention_fwd_kernel", "_tree_attention_merge_kernel", "_hidden_transfer_fwd_kernel"}
    for r in launches:
        assert r["shared"] <= SHARED_LIMIT[arch], f"needs {r['shared']} B of shared memory: {r}"
        if arch == 90 and r["kernel"] == "_tree_attention_fwd_kernel" and r["config"]["DOT_PREC"] != "ieee":
            assert r["stack"] == 0, f"spills registers: {r}"
            if r["config"]["BLOCK_M"] >= 64:  # a warpgroup's 64 rows: Hopper's asynchronous warpgroup MMA
                assert r["wgmma"], f"16-bit tiles of >= 64 query rows lower to mma.sync, not wgmma: {r}"
