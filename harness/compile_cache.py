"""Compiled code kept across processes: inductor's and Triton's on-disk caches under the parity
cache (``$PARITY_CACHE/compile``, beside the baseline cache), so a second run, or a nightly shard
that restores the cache, loads compiled kernels instead of generating and compiling them again.

Both caches key their entries by what they compiled (the FX graph, its inputs' properties, the
compiler's configuration and torch's version), so a changed or mutated engine graph misses them
rather than reusing a stale kernel; what ``parity`` adds is only where they live. Ranks inherit
the location from the driver's environment (the Ray launcher forwards it, see
``harness.launch.ray_launcher.FORWARDED_ENV``). A location the user set is kept (one equal to
torch's default is taken for torch's own).
"""

from __future__ import annotations

import os
from pathlib import Path

from scenarios.models import cache_root

# The environment variables torch's inductor and Triton read their cache directories from.
INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
TRITON_ENV = "TRITON_CACHE_DIR"


def compile_cache_dir(root: Path | None = None) -> Path:
    return (root or cache_root()) / "compile"


def use_compile_cache(root: Path | None = None) -> dict[str, str]:
    """Point inductor's and Triton's caches into the parity cache unless already set; returns the
    locations in effect."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    base = compile_cache_dir(root)
    # torch writes its default into the environment the first time it looks the directory up
    # (``cache_dir()``), so the default found there is torch's, not a choice of the user's.
    current = os.environ.get(INDUCTOR_ENV)
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ[INDUCTOR_ENV] = str(base / "inductor")
    os.environ.setdefault(TRITON_ENV, str(base / "triton"))
    return {INDUCTOR_ENV: os.environ[INDUCTOR_ENV], TRITON_ENV: os.environ[TRITON_ENV]}
