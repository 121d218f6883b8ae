"""Repository conftest: environment defaults. (The parity pytest plugin is loaded through its
``pytest11`` entry point, ``parity.pytest_plugin``.)"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# Without a GPU the Triton kernels are tested under Triton's interpreter, which must be chosen
# before triton is first imported in the process (triton decorates its own helpers at import).
# The engine itself never runs Triton on CPU tensors, so this changes nothing else.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(1)
