"""train.reuse_host_memory: glibc malloc keeps XLA:CPU's freed temporary buffers, so repeated executions stop
page-faulting fresh memory in; only before JAX starts, only for the CPU backend."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import jax
import pytest

from ftjax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted program whose intermediates (36 MB each) are above glibc's 32 MB mmap limit: page faults per call.
_FAULTS = textwrap.dedent("""
    import os, resource, sys
    from ftjax import host_memory
    applied = host_memory.reuse_freed_memory() if sys.argv[1] == "reuse" else False
    import jax, jax.numpy as jnp

    @jax.jit
    def f(x):
        return (jnp.tanh(jnp.sin(x) @ jnp.cos(x).T) @ x).sum()

    x = jnp.ones((3072, 3072), jnp.float32)
    f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        f(x).block_until_ready()
    print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
""")


def _python(code: str, *args: str, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": REPO, **env}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_reused_memory_is_not_page_faulted_in_again():
    plain = _python(_FAULTS, "plain", JAX_PLATFORMS="cpu").split()
    reuse = _python(_FAULTS, "reuse", JAX_PLATFORMS="cpu").split()
    assert plain[0] == "False" and reuse[0] == "True"
    # Measured: ~900k minor faults per call without, ~0 with (the freed block comes back already mapped).
    assert float(plain[1]) > 10_000 and float(reuse[1]) < 0.05 * float(plain[1]), (plain, reuse)


def test_only_for_the_cpu_backend_and_only_before_jax_starts():
    code = "from ftjax import host_memory; print(host_memory.cpu_backend_only(), host_memory.reuse_freed_memory())"
    assert _python(code, JAX_PLATFORMS="cuda") == "False False"  # an accelerator run: malloc left alone
    assert _python(code, JAX_PLATFORMS="cpu").split()[0] == "True"
    jax.devices()  # this process's backend has started: too late for the arena setting
    assert host_memory.reuse_freed_memory() is False
