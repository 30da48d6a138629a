"""Build real megatron-core torch_dist checkpoints for tests, and read them back.

Public API (used by tests/conftest.py and by the merge-engine tests)::

    make_run(save_dir, *, tp=1, pp=1, iterations=(10, 20, 30), optimizer="none",
             dtype="fp32", num_layers=4, seed=0, nproc=None, megatron_path=None,
             extra_args=()) -> list[Path]
    eval_loss(ckpt_dir, *, tp=1, num_layers=4, dtype="fp32", megatron_path=None) -> float
    eval_losses(ckpt_dirs, *, tp=1, ...) -> list[float]          # one launch for many
    eval_state_dict(ckpt_dir, *, tp=1, num_layers=4, dtype="fp32") -> (loss, dict[str, Tensor])
    load_full_tensors(ckpt_dir, keys=None) -> dict[str, Tensor]   # plain DCP, no megatron
    read_metadata(ckpt_dir) -> torch DCP Metadata
    sharded_object_keys(ckpt_dir) -> list[str]                     # byte entries
    read_common(ckpt_dir) -> dict                                  # common.pt
    read_common_any(ckpt_dir) -> dict                              # common.pt or 0.19 DCP entry
    install_megatron_core(version) -> Path                         # pip --target, cached
    copy_run(ckpt_dirs, dest) -> list[Path]                        # writable copy of a run
    cached_run(name, **make_run_kwargs) -> list[Path]             # built once per session

The checkpoints are produced by ``tests/fixtures/save_gpt_checkpoints.py`` with gloo, one
process per rank; see that script for the on-disk layout. The ranks are started directly
with torchrun's env:// variables (fast); ``PMA_FIXTURE_LAUNCHER=torchrun`` uses
``python -m torch.distributed.run`` instead. ``save_dir`` must not already hold the
requested iterations. ``load_full_tensors`` deliberately imports only torch. Environment:
``PMA_TEST_CACHE`` (persistent cache dir), ``PMA_FIXTURE_TIMING=1`` (saver phase times).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SAVER = FIXTURES / "save_gpt_checkpoints.py"
EVALUATOR = FIXTURES / "eval_gpt_checkpoint.py"
REPO = Path(__file__).resolve().parent.parent

#: wall seconds spent building each cached run, for reporting (name -> seconds)
BUILD_TIMES: dict[str, float] = {}
#: CPU seconds (user + sys of the rank processes) per cached run (name -> seconds)
BUILD_CPU: dict[str, float] = {}


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class FixtureBuildError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(megatron_path: str | os.PathLike | None = None) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    paths = [str(REPO)]
    if megatron_path is not None:
        paths.insert(0, str(megatron_path))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _launcher() -> str:
    """``direct`` (default): start the ranks ourselves with the env:// variables torchrun
    would set; saves the launcher's own torch import and rendezvous (5-10 s per launch on a
    busy 2-core box). ``PMA_FIXTURE_LAUNCHER=torchrun`` uses ``python -m torch.distributed.run``.
    """
    return os.environ.get("PMA_FIXTURE_LAUNCHER", "direct")


def _torchrun(script: Path, nproc: int, args: list[str], *, megatron_path=None, timeout=900):
    env = _env(megatron_path)
    if _launcher() == "torchrun":
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
            str(script), *args,
        ]  # fmt: skip
        proc = subprocess.run(
            cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=timeout,
        )  # fmt: skip
        if proc.returncode != 0:
            raise FixtureBuildError(
                f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{proc.stdout[-6000:]}"
            )
        return proc.stdout
    return _run_ranks([sys.executable, str(script), *args], nproc, env, timeout)


def _run_ranks(cmd: list[str], nproc: int, env: dict, timeout: float) -> str:
    """Run ``cmd`` as ``nproc`` ranks of one gloo job; if one fails, stop the others."""
    port = str(_free_port())
    procs, logs = [], []
    with tempfile.TemporaryDirectory(prefix="pma-ranks-") as td:
        try:
            for rank in range(nproc):
                renv = dict(env)
                renv.update(
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(nproc),
                    RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
                    GROUP_RANK="0", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(nproc),
                )  # fmt: skip
                log = open(Path(td) / f"rank{rank}.log", "w+")
                logs.append(log)
                procs.append(
                    subprocess.Popen(
                        cmd, env=renv, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT
                    )
                )
            deadline = time.monotonic() + timeout
            failed = None
            while True:
                codes = [p.poll() for p in procs]
                bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
                if bad:
                    failed = f"rank {bad[0][0]} exited with code {bad[0][1]}"
                    break
                if all(c == 0 for c in codes):
                    break
                if time.monotonic() > deadline:
                    failed = f"timed out after {timeout} s"
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
        outputs = []
        for rank, log in enumerate(logs):
            log.seek(0)
            outputs.append(f"--- rank {rank} ---\n" + log.read())
            log.close()
    out = "\n".join(outputs)
    if failed:
        raise FixtureBuildError(f"{' '.join(cmd)} x{nproc}: {failed}\n{out[-8000:]}")
    return out


def make_run(
    save_dir,
    *,
    tp: int = 1,
    pp: int = 1,
    iterations=(10, 20, 30),
    optimizer: str = "none",
    dtype: str = "fp32",
    num_layers: int = 4,
    seed: int = 0,
    nproc: int | None = None,
    megatron_path=None,
    extra_args=(),
) -> list[Path]:
    """Train + save a Megatron-LM-style save dir; returns its checkpoint dirs, oldest first.

    ``nproc`` defaults to ``tp * pp`` (DP=1); a multiple of it adds data parallelism.
    """
    save_dir = Path(save_dir)
    nproc = nproc or tp * pp
    its = sorted(int(i) for i in iterations)
    args = [
        "--save-dir", str(save_dir),
        "--tp", str(tp),
        "--pp", str(pp),
        "--iterations", ",".join(map(str, its)),
        "--optimizer", optimizer,
        "--dtype", dtype,
        "--num-layers", str(num_layers),
        "--seed", str(seed),
        *map(str, extra_args),
    ]  # fmt: skip
    _torchrun(SAVER, nproc, args, megatron_path=megatron_path)
    dirs = [save_dir / f"iter_{i:07d}" for i in its]
    missing = [d for d in dirs if not (d / "metadata.json").exists()]
    if missing:
        raise FixtureBuildError(f"saver finished but these checkpoints are incomplete: {missing}")
    return dirs


def eval_losses(
    ckpt_dirs,
    *,
    tp: int = 1,
    num_layers: int = 4,
    dtype: str = "fp32",
    megatron_path=None,
) -> list[float]:
    """LM loss of each checkpoint on one fixed batch, loaded with megatron at TP=``tp``.

    One torchrun launch for all of them (process start + megatron import dominate).
    """
    import json

    ckpt_dirs = [str(d) for d in ckpt_dirs]
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "loss.json"
        _torchrun(
            EVALUATOR,
            tp,
            [
                "--load", *ckpt_dirs, "--tp", str(tp), "--num-layers", str(num_layers),
                "--dtype", dtype, "--out", str(out),
            ],  # fmt: skip
            megatron_path=megatron_path,
        )
        return [float(x) for x in json.loads(out.read_text())["losses"]]


def eval_loss(
    ckpt_dir,
    *,
    tp: int = 1,
    num_layers: int = 4,
    dtype: str = "fp32",
    megatron_path=None,
) -> float:
    """LM loss of the checkpoint's model on a fixed batch, loaded at tensor parallelism ``tp``."""
    return eval_losses(
        [ckpt_dir], tp=tp, num_layers=num_layers, dtype=dtype, megatron_path=megatron_path
    )[0]


def eval_state_dict(ckpt_dir, *, tp: int = 1, num_layers: int = 4, dtype: str = "fp32"):
    """``(loss, {sharded key: full tensor})`` as megatron's ``dist_checkpointing.load`` gives
    them (model only, gathered over TP), from the evaluator script."""
    import json

    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "sd.pt"
        res = Path(td) / "loss.json"
        _torchrun(
            EVALUATOR,
            tp,
            [
                "--load", str(ckpt_dir), "--tp", str(tp), "--num-layers", str(num_layers),
                "--dtype", dtype, "--state-dict-out", str(out), "--out", str(res),
            ],  # fmt: skip
        )
        return float(json.loads(res.read_text())["loss"]), torch.load(out, weights_only=True)


def read_metadata(ckpt_dir):
    """The DCP ``Metadata`` of a checkpoint (plain torch; works for mcore >= 0.15 saves)."""
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(ckpt_dir)).read_metadata()


def load_full_tensors(ckpt_dir, keys=None) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint as a full (unsharded) tensor, in one process.

    Uses only ``torch.distributed.checkpoint`` (no megatron import, no process group).
    Sharded objects (BytesStorageMetadata) are skipped. ``keys`` restricts the result.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(ckpt_dir))
    md = reader.read_metadata()
    sd = {}
    for key, meta in md.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            continue
        if keys is not None and key not in keys:
            continue
        sd[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if sd:
        import warnings

        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(sd, storage_reader=FileSystemReader(str(ckpt_dir)), no_dist=True)
    return sd


def sharded_object_keys(ckpt_dir) -> list[str]:
    """Keys of the byte (sharded-object) entries of a checkpoint, e.g. ``rng_state/shard_0.0_1.2``."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md = read_metadata(ckpt_dir)
    return sorted(k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))


def read_common(ckpt_dir) -> dict:
    """``common.pt`` (unpickling ``args`` etc. may need megatron importable)."""
    return torch.load(Path(ckpt_dir) / "common.pt", map_location="cpu", weights_only=False)


def read_common_any(ckpt_dir) -> dict:
    """The common (non-tensor) state whatever the megatron-core version that saved it:
    ``common.pt`` (<= 0.18) or the DCP byte entry ``common_state/shard_0_1`` (0.19+), whose
    bytes are ``torch.save([state_dict])``. Unpickling ``args`` is plain argparse here."""
    import io

    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / "common.pt").exists():
        return read_common(ckpt_dir)
    md = read_metadata(ckpt_dir)
    for idx, info in md.storage_data.items():
        if idx.fqn == "common_state/shard_0_1":
            with open(ckpt_dir / info.relative_path, "rb") as f:
                f.seek(info.offset)
                raw = f.read(info.length)
            obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)
            return obj[0] if isinstance(obj, list) else obj
    raise FileNotFoundError(f"{ckpt_dir}: neither common.pt nor a common_state entry")


# --------------------------------------------------------------------------- other megatron-core


def install_megatron_core(version: str, dest=None) -> Path:
    """``pip install --no-deps --target`` megatron-core ``version`` (cached); returns the dir
    to pass as ``megatron_path`` to :func:`make_run` / :func:`eval_losses`.

    Raises FixtureBuildError when pip cannot fetch it (offline): callers skip.
    ``--ignore-requires-python``: 0.19.x declares Python >= 3.12 but imports and saves fine
    on 3.11 (with the triton stand-in in fixtures/gpt_common.py).
    """
    import fcntl

    root = Path(dest) if dest is not None else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"megatron-core-{version}"
    marker = target / ".complete"
    with open(root / f"megatron-core-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return target
        if target.exists():
            shutil.rmtree(target)
        cmd = [
            sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "--no-deps", "--ignore-requires-python", "--target", str(target),
            f"megatron-core=={version}",
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300
            )
        except subprocess.TimeoutExpired as e:
            raise FixtureBuildError(f"pip timed out fetching megatron-core=={version}") from e
        if proc.returncode != 0 or not (target / "megatron" / "core").is_dir():
            shutil.rmtree(target, ignore_errors=True)
            raise FixtureBuildError(
                f"pip could not install megatron-core=={version}: {proc.stdout.strip()[-1500:]}"
            )
        marker.write_text(version)
    return target


# --------------------------------------------------------------------------- session cache


_SESSION_ROOT: Path | None = None


def set_session_cache_root(path) -> None:
    """Used by conftest.py: the per-session directory when $PMA_TEST_CACHE is not set."""
    global _SESSION_ROOT
    _SESSION_ROOT = Path(path)


def cache_root() -> Path:
    """Where cached runs live.

    ``$PMA_TEST_CACHE`` if set (persistent: later sessions reuse complete entries, the key
    includes the saver's source, megatron-core's and torch's versions), else the per-session
    directory conftest.py registers, else a fresh temp dir for this process.
    """
    global _SESSION_ROOT
    root = os.environ.get("PMA_TEST_CACHE")
    if root:
        p = Path(root)
    else:
        if _SESSION_ROOT is None:
            _SESSION_ROOT = Path(tempfile.mkdtemp(prefix="pma-ckpt-cache-"))
        p = _SESSION_ROOT
    p.mkdir(parents=True, exist_ok=True)
    return p


def _cache_tag(name: str, kwargs: dict) -> str:
    import hashlib
    from importlib import metadata

    try:
        mcore = metadata.version("megatron-core")
    except metadata.PackageNotFoundError:  # pragma: no cover
        mcore = "?"
    # The saver's source is part of the key, so editing it invalidates the cache.
    h = hashlib.sha256()
    h.update(repr(sorted(kwargs.items())).encode())
    h.update(f"{mcore} {torch.__version__} {sys.version_info[:2]}".encode())
    for f in (SAVER, FIXTURES / "gpt_common.py"):
        h.update(f.read_bytes())
    return f"{name}-{h.hexdigest()[:12]}"


def build_cached(tag: str, build, name: str | None = None) -> Path:
    """``build(tmp)`` once per cache entry ``tag``; returns the entry's folder.

    The build runs in a hidden temporary folder renamed into place when done, under a lock file
    per entry (safe against concurrent pytest processes); every file it wrote is made read-only.
    """
    import fcntl

    root = cache_root()
    final = root / tag
    with open(root / f"{tag}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / ".complete").exists():
            if final.exists():
                shutil.rmtree(final)
            tmp = Path(tempfile.mkdtemp(prefix=f".{tag}-", dir=root))
            t0 = time.perf_counter()
            c0 = _children_cpu()
            try:
                build(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if name:
                BUILD_TIMES[name] = time.perf_counter() - t0  # reported by conftest.py
                BUILD_CPU[name] = _children_cpu() - c0
            for f in tmp.rglob("*"):
                if f.is_file():
                    f.chmod(0o444)  # inputs are never to be modified: make accidents loud
            (tmp / ".complete").write_text(f"{time.perf_counter() - t0:.2f}\n")
            os.replace(tmp, final)
    return final


def cached_run(name: str, **kwargs) -> list[Path]:
    """``make_run`` once per cache (see :func:`cache_root`); returns the cached checkpoint dirs.

    Treat the returned directories as read-only (copy them with :func:`copy_run` before
    modifying anything).
    """
    its = sorted(int(i) for i in kwargs.get("iterations", (10, 20, 30)))
    final = build_cached(_cache_tag(name, kwargs), lambda tmp: make_run(tmp / "save", **kwargs), name)
    return [final / "save" / f"iter_{i:07d}" for i in its]


def copy_run(ckpt_dirs, dest) -> list[Path]:
    """Copy a cached run's save dir (tracker included) to ``dest``; returns the new ckpt dirs."""
    ckpt_dirs = [Path(d) for d in ckpt_dirs]
    src = ckpt_dirs[0].parent
    dest = Path(dest)
    shutil.copytree(src, dest)
    for p in [dest, *dest.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    return [dest / d.name for d in ckpt_dirs]
