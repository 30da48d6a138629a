"""Shims that let megatron-core run on a CUDA-less torch (CPU + gloo).

The one place where the project patches megatron-core / torch behaviour. Only the
training example, the test fixtures and the demo call :func:`apply_cpu_shims`; the merge
engine never imports megatron at all.

Why each shim exists (seen with megatron-core 0.16.1, torch 2.13.0+cpu):
- ``torch.cuda.synchronize`` is called unconditionally by the checkpoint savers and the
  training loop; on a CPU build it raises.
- ``torch.cuda.current_device`` is used to pick the device of staging tensors; "cpu" keeps
  them on the host.

And one note instead of megatron-core's import-time warnings: importing ``megatron.core`` warns
"Transformer Engine and Apex are not installed. Falling back to ..." four times (its optimizer,
``clip_grads``, ``optimizer.py`` and Megatron-FSDP's ``mixed_precision``, each once per process:
every spawned checkpoint-saver process repeats them) plus "Apex is not installed. Falling back to
Torch Norm". On CPU that fallback is the only option and works; :func:`quiet_cpu_fallback_warnings`
filters them here and in child processes (``PYTHONWARNINGS``) and says once what they mean.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import torch

_applied = False
# Leading words of megatron-core's fallback warnings (PYTHONWARNINGS matches a message's start).
FALLBACK_WARNINGS = ("Transformer Engine and Apex are not installed", "Apex is not installed",
                     # megatron-core 0.16's own TransformerConfig default warns about itself
                     "full scope is deprecated")
FALLBACK_NOTE = ("note: Transformer Engine and Apex are not installed: megatron-core uses torch's "
                 "AdamW, norms and multi-tensor ops instead (expected on CPU; on GPUs install them "
                 "for speed). Its per-process warnings about this are hidden.")


def apply_cpu_shims() -> bool:
    """Patch the CUDA calls megatron-core makes unconditionally. Returns True if applied.

    A no-op when CUDA is available, so GPU runs are untouched.
    """
    global _applied
    if _applied or torch.cuda.is_available():
        return _applied
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    quiet_cpu_fallback_warnings()
    _applied = True
    return True


def quiet_cpu_fallback_warnings(note: bool = True) -> None:
    """Hide megatron-core's "not installed, falling back" warnings in this process and the ones it
    spawns; print :data:`FALLBACK_NOTE` once (rank 0) when neither TE nor Apex is installed.

    Call before ``megatron.core`` is imported (its warnings fire at import time)."""
    for text in FALLBACK_WARNINGS:
        warnings.filterwarnings("ignore", message=text, category=UserWarning)
    spec = ",".join(f"ignore:{text}:UserWarning" for text in FALLBACK_WARNINGS)
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), spec]))
    missing = all(importlib.util.find_spec(m) is None for m in ("transformer_engine", "apex"))
    if note and missing and os.environ.get("RANK", "0") == "0" and not os.environ.get("MEGATRON_PMA_NOTED"):
        os.environ["MEGATRON_PMA_NOTED"] = "1"  # children (spawned savers, torchrun ranks) stay quiet
        print(FALLBACK_NOTE, file=sys.stderr, flush=True)
