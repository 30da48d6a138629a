"""Megatron-core's ``integrity.json``: SHA-256 of every top-level file of a checkpoint.

Format (megatron-core 0.19 ``dist_checkpointing/validation.py``):
``{"algorithm": "sha256", "files": {"<name>": "<hex digest>", ...}}``, the manifest itself excluded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megatron_pma.errors import PMAError

INTEGRITY_FILE = "integrity.json"
_BLOCK = 8 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_BLOCK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def verify(ckpt_dir: Path) -> bool:
    """Check a checkpoint against its manifest; False if it has none, PMAError on a mismatch."""
    manifest = Path(ckpt_dir) / INTEGRITY_FILE
    if not manifest.exists():
        return False
    try:
        data = json.loads(manifest.read_text())
        algorithm, files = data.get("algorithm", "sha256"), data["files"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise PMAError(f"{manifest}: unreadable integrity manifest ({e})") from None
    if algorithm != "sha256":
        raise PMAError(f"{manifest}: unsupported hash algorithm {algorithm!r}")
    for name, expected in sorted(files.items()):
        path = Path(ckpt_dir) / name
        try:
            actual = file_sha256(path)
        except OSError as e:
            raise PMAError(f"{path}: listed in {INTEGRITY_FILE} but unreadable ({e.strerror})") from None
        if actual != expected:
            raise PMAError(f"{path}: SHA-256 does not match {INTEGRITY_FILE} (corrupted)")
    return True


def write(ckpt_dir: Path, known: dict[str, str] | None = None) -> None:
    """Write the manifest; ``known`` holds digests already computed (e.g. by other ranks)."""
    known = dict(known or {})
    files = {}
    for entry in sorted(Path(ckpt_dir).iterdir(), key=lambda p: str(p)):
        if entry.is_file() and entry.name != INTEGRITY_FILE:
            files[entry.name] = known.get(entry.name) or file_sha256(entry)
    (Path(ckpt_dir) / INTEGRITY_FILE).write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=2))
