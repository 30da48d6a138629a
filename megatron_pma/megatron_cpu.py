"""Shims that let megatron-core run on a CUDA-less torch (CPU + gloo).

The one place where the project patches megatron-core / torch behaviour. Only the
training example, the test fixtures and the demo call :func:`apply_cpu_shims`; the merge
engine never imports megatron at all.

Why each shim exists (seen with megatron-core 0.16.1, torch 2.13.0+cpu):
- ``torch.cuda.synchronize`` is called unconditionally by the checkpoint savers and the
  training loop; on a CPU build it raises.
- ``torch.cuda.current_device`` is used to pick the device of staging tensors; "cpu" keeps
  them on the host.
"""

from __future__ import annotations

import torch

_applied = False


def apply_cpu_shims() -> bool:
    """Patch the CUDA calls megatron-core makes unconditionally. Returns True if applied.

    A no-op when CUDA is available, so GPU runs are untouched.
    """
    global _applied
    if _applied or torch.cuda.is_available():
        return _applied
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    _applied = True
    return True
