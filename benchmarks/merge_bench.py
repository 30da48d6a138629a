"""Merge throughput and memory vs the I/O floor and a naive full-load DCP merge (not a test).

    python benchmarks/merge_bench.py [--layout synthetic|gpt-tp2|both] [--size-gib 1.0] [--k 4]
        [--dtype fp32|bf16] [--cache /tmp/pma-bench-cache] [--repeat 3] [--skip-naive]
        [--skip-nofsync] [--rebuild] [--cache-max-gib 12]
    python benchmarks/merge_bench.py --safetensors [--size-gib 1.0] [--k 4] [--dtype fp32|bf16] [--repeat 3]

Layouts (k checkpoints of >= SIZE GiB each, built once under --cache and reused by later runs):
  synthetic  plain DCP saves (one process) with GPT key names: stacked [layers, ...] layer keys,
             each key one chunk, embedding/output, a byte object, metadata.json + common.pt;
             hidden 1024, vocab 32768 (below 0.5 GiB: 512, 8192), layers chosen to reach SIZE
  gpt-tp2    real Megatron-Core GPTModel saves: tests/fixtures/save_gpt_checkpoints.py under
             torchrun, TP=2 (gloo, CPU), one AdamW step between saves (the k inputs differ);
             hidden 1024, 16 heads, FFN 4096, vocab 32768, layers chosen to reach SIZE
             (below 0.5 GiB: hidden 512, FFN 2048, vocab 8192)
For each layout, in the same run, best of --repeat rounds, the inputs read into the page cache
right before every timed command (the residency is checked with mincore and reported):
  floor    read every input byte (cat > /dev/null) + write one checkpoint's bytes (then fsync it)
  import   python -c 'import torch' (what each torchrun rank pays; the merge itself never imports torch)
  ours/1   `python -m megatron_pma merge` with one process
  workers  the same with --workers 2 (two processes forked by the merge itself)
  ours/2   the same under torchrun --nproc_per_node 2 (outputs of 1 and 2 must be identical)
  naive    plain DCP: load every input's full state dict, average in fp32, dcp.save (one round)
  ours/1, --workers 2 with --no-fsync: the CPU-bound case (nothing waits for the disk)
It prints wall seconds end to end, the engine's own seconds (pma_provenance.json: after process
start-up and imports; torchrun's start-up dominates end to end on few cores), ratios to the
floor, peak RSS per process and the bound 512 MiB + 2 x the largest chunk. Outputs are written
under --cache and removed; the cache stays under --cache-max-gib (least recently used inputs
are evicted).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAVER = REPO / "tests" / "fixtures" / "save_gpt_checkpoints.py"
ITEMSIZE = {"fp32": 4, "bf16": 2}
SEQ = 32  # tests/fixtures/gpt_common.SEQ (learned position embeddings)
GIB, MIB = 2**30, 2**20


# ---------------------------------------------------------------------------------------------
# Inputs


def synthetic_inputs(root: Path, k: int, gib: float, dtype: str) -> dict:
    import torch
    import torch.distributed.checkpoint as dcp

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    hidden, vocab = (1024, 32768) if gib >= 0.5 else (512, 8192)
    per_layer = 12 * hidden * hidden  # qkv + proj + fc1 + fc2 (4x MLP)
    layers = max(1, math.ceil((gib * GIB / ITEMSIZE[dtype] - 2 * vocab * hidden) / per_layer))
    for i in range(k):
        g = torch.Generator().manual_seed(i)
        sd = {
            "embedding.word_embeddings.weight": torch.randn(vocab, hidden, generator=g).to(dt),
            "output_layer.weight": torch.randn(vocab, hidden, generator=g).to(dt),
            "decoder.final_layernorm.weight": torch.ones(hidden, dtype=dt),
            "decoder.layers.self_attention.linear_qkv.weight": torch.randn(layers, 3 * hidden, hidden, generator=g).to(dt),
            "decoder.layers.self_attention.linear_proj.weight": torch.randn(layers, hidden, hidden, generator=g).to(dt),
            "decoder.layers.mlp.linear_fc1.weight": torch.randn(layers, 4 * hidden, hidden, generator=g).to(dt),
            "decoder.layers.mlp.linear_fc2.weight": torch.randn(layers, hidden, 4 * hidden, generator=g).to(dt),
            "rng_state": {"seed": i},
        }
        d = root / f"iter_{(i + 1) * 1000:07d}"
        dcp.save(sd, checkpoint_id=str(d), no_dist=True)
        (d / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
        torch.save({"iteration": (i + 1) * 1000}, d / "common.pt")
        del sd
    (root / "latest_checkpointed_iteration.txt").write_text(str(k * 1000))
    return {"model": f"stacked layer keys, hidden {hidden}, {layers} layers, vocab {vocab}, one process"}


def gpt_dims(gib: float, dtype: str) -> dict:
    """GPT dimensions whose parameter bytes reach ``gib`` (local spec, untied embeddings)."""
    if gib >= 0.5:
        h, heads, ffn, vocab = 1024, 16, 4096, 32768
    else:
        h, heads, ffn, vocab = 512, 8, 2048, 8192
    per_layer = 4 * h * h + 2 * ffn * h + 9 * h + ffn  # qkv, proj, fc1, fc2 + biases + 2 layernorms
    fixed = 2 * vocab * h + SEQ * h + 2 * h  # word + output embeddings, positions, final layernorm
    layers = max(1, math.ceil((gib * GIB / ITEMSIZE[dtype] - fixed) / per_layer))
    return {"hidden": h, "heads": heads, "ffn": ffn, "vocab": vocab, "num_layers": layers,
            "params": fixed + layers * per_layer}


def gpt_tp2_inputs(root: Path, k: int, gib: float, dtype: str) -> dict:
    dims = gpt_dims(gib, dtype)
    iterations = ",".join(str((i + 1) * 1000) for i in range(k))
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", TORCH_CPP_LOG_LEVEL="ERROR",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SAVER),
           "--save-dir", str(root), "--tp", "2", "--iterations", iterations, "--max-steps-per-save", "1",
           "--dtype", dtype, "--optimizer", "none",
           *(f"--{name.replace('_', '-')}={dims[name]}" for name in ("num_layers", "hidden", "heads", "ffn", "vocab"))]
    out = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stdout[-6000:]}")
    return {"model": (f"GPTModel hidden {dims['hidden']}, {dims['num_layers']} layers, FFN {dims['ffn']}, "
                      f"vocab {dims['vocab']}, {dims['params'] / 1e6:.0f} M params, TP=2, "
                      "one AdamW step between saves")}


BUILDERS = {"synthetic": synthetic_inputs, "gpt-tp2": gpt_tp2_inputs}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cached_inputs(cache: Path, layout: str, k: int, gib: float, dtype: str, rebuild: bool,
                  max_gib: float, keep: set[str]) -> tuple[list[Path], dict]:
    """The k input checkpoints of one layout, built once under ``cache``; returns (dirs, info)."""
    name = f"{layout}-{dtype}-{gib:g}gib-k{k}"
    entry = cache / name
    marker = entry / "bench.json"
    if rebuild or not marker.exists():
        shutil.rmtree(entry, ignore_errors=True)
        _make_room(cache, need=k * gib * GIB * 1.05 + 2 * gib * GIB, max_gib=max_gib, keep=keep | {name})
        tmp = cache / f".{name}.building"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t = time.perf_counter()
        info = BUILDERS[layout](tmp, k, gib, dtype)
        info["build_s"] = round(time.perf_counter() - t, 1)
        (tmp / "bench.json").write_text(json.dumps(info))
        tmp.rename(entry)
        print(f"[{layout}] built {k} checkpoints in {info['build_s']:.0f} s -> {entry}", flush=True)
    else:
        print(f"[{layout}] reusing {entry}", flush=True)
    os.utime(marker)  # least recently used entries are evicted first
    dirs = sorted(entry.glob("iter_*"))
    if len(dirs) != k:
        raise SystemExit(f"{entry}: expected {k} checkpoints, found {len(dirs)} (rerun with --rebuild)")
    return dirs, json.loads(marker.read_text())


def _make_room(cache: Path, need: float, max_gib: float, keep: set[str]) -> None:
    """Evict least recently used cache entries (not in ``keep``) until ``need`` more bytes fit."""
    cache.mkdir(parents=True, exist_ok=True)
    entries = sorted((p for p in cache.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    used = sum(du(p) for p in entries)
    for p in entries:
        if used + need <= max_gib * GIB:
            break
        if p.name in keep:
            continue
        used -= du(p)
        print(f"evicting {p} (cache limit {max_gib:g} GiB)", flush=True)
        shutil.rmtree(p)
    if used + need > max_gib * GIB:
        raise SystemExit(f"{cache}: {used / GIB:.1f} GiB used + {need / GIB:.1f} GiB needed > --cache-max-gib "
                         f"{max_gib:g}")


def chunk_stats(ckpt: Path) -> tuple[int, int, int]:
    """(largest chunk bytes, number of tensor chunks, number of data files) of one checkpoint."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(ckpt)).read_metadata()
    largest, chunks = 0, 0
    for v in md.state_dict_metadata.values():
        if isinstance(v, TensorStorageMetadata):
            itemsize = torch.empty((), dtype=v.properties.dtype).element_size()
            for c in v.chunks:
                chunks += 1
                largest = max(largest, math.prod(c.sizes) * itemsize)
    files = len({s.relative_path for s in md.storage_data.values()})
    return largest, chunks, files


# ---------------------------------------------------------------------------------------------
# Measurements


def timed(cmd: list[str], env=None) -> tuple[float, float]:
    """Wall seconds, and peak RSS (MiB) of the largest process the command ran."""
    wrapper = ("import resource,subprocess,sys,time;t=time.perf_counter();"
               "r=subprocess.run(sys.argv[1:]);w=time.perf_counter()-t;"
               "print(w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024);sys.exit(r.returncode)")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    wall, rss = out.stdout.strip().splitlines()[-1].split()
    return float(wall), float(rss)


NAIVE = r"""
import sys, torch, torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
inputs, out = sys.argv[1:-1], sys.argv[-1]
acc = None
for p in inputs:
    md = FileSystemReader(p).read_metadata()
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
          if isinstance(v, TensorStorageMetadata)}
    dcp.load(sd, checkpoint_id=p, no_dist=True)
    if acc is None:
        acc = {k: v.float() / len(inputs) for k, v in sd.items()}
    else:
        for k, v in sd.items():
            acc[k] += v.float() / len(inputs)
    dtypes = {k: v.dtype for k, v in sd.items()}
    del sd
dcp.save({k: v.to(dtypes[k]) for k, v in acc.items()}, checkpoint_id=out, no_dist=True)
"""


def resident_fraction(files: list[str]) -> float | None:
    """Fraction of the files' pages in the page cache (mincore), None where it cannot be told."""
    try:
        import ctypes
        import mmap

        import numpy as np

        libc = ctypes.CDLL(None, use_errno=True)
        total = resident = 0
        for f in files:
            size = os.path.getsize(f)
            if size == 0:
                continue
            with open(f, "rb") as fh, mmap.mmap(fh.fileno(), size, prot=mmap.PROT_READ) as m:
                pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
                vec = (ctypes.c_ubyte * pages)()
                view = np.frombuffer(m, dtype=np.uint8)
                rc = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec)
                del view
                if rc != 0:
                    return None
                resident += sum(v & 1 for v in bytes(vec))
                total += pages
        return resident / max(total, 1)
    except Exception:
        return None


def warm(files: list[str], seen: list) -> None:
    """Read the inputs into the page cache right before a timed run (on some VMs the host
    reclaims guest page cache within seconds), and record how much of it was resident."""
    for _ in range(3):
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
        frac = resident_fraction(files)
        if frac is None or frac >= 0.999:
            break
    seen.append(frac)


def data_files(dirs: list[Path]) -> list[str]:
    return [str(f) for d in dirs for f in sorted(d.iterdir()) if f.is_file()]


def same_output(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.name.endswith(".distcp") or p.name == ".metadata")
    return names == sorted(p.name for p in b.iterdir() if p.name.endswith(".distcp") or p.name == ".metadata") \
        and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def bench_layout(layout: str, inputs: list[Path], info: dict, work: Path, args) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TORCH_CPP_LOG_LEVEL="ERROR")
    files = data_files(inputs)
    in_bytes = sum(os.path.getsize(f) for f in files)
    out_bytes = du(inputs[-1])
    largest, chunks, nfiles = chunk_stats(inputs[-1])
    bound = 512 + 2 * largest / MIB
    print(f"[{layout}] k={len(inputs)} x {in_bytes / len(inputs) / GIB:.2f} GiB {args.dtype}: {info['model']}; "
          f"{chunks} chunks in {nfiles} files, largest chunk {largest / MIB:.0f} MiB", flush=True)
    resident: list = []

    def ours(nproc: int, fsync: bool = True, workers: bool = False) -> tuple[float, float, float]:
        """nproc processes: forked by the merge itself (--workers) or started by torchrun."""
        out = work / (f"outw{nproc}" if workers else f"out{nproc}")
        shutil.rmtree(out, ignore_errors=True)
        merge = ["-m", "megatron_pma", "merge", *map(str, inputs), "--output", str(out), "--quiet"]
        merge += [] if fsync else ["--no-fsync"]
        if workers:
            cmd = [sys.executable, *merge, "--workers", str(nproc)]
        else:
            cmd = [sys.executable, *merge, "--workers", "1"] if nproc == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *merge]
        warm(files, resident)
        wall, rss = timed(cmd, env)
        engine = json.loads((out / "pma_provenance.json").read_text())["seconds"]
        return wall, rss, engine

    best: dict[str, tuple] = {}

    def keep_best(name, value):
        """Lowest time (wall, and engine seconds where there are) but highest peak RSS over rounds."""
        old = best.get(name)
        if old is None:
            best[name] = value
        elif name == "floor":
            best[name] = min(old, value)
        else:
            best[name] = (min(old[0], value[0]), max(old[1], value[1]), *map(min, old[2:], value[2:]))

    floor_file = work / "floor.bin"
    for nproc in (1, 2):  # warm-up (imports, the outputs' directory)
        ours(nproc)
        shutil.rmtree(work / f"out{nproc}")
    for r in range(args.repeat):
        warm(files, resident)
        read_s, _ = timed(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files])
        write_s, _ = timed(["sh", "-c", f"head -c {out_bytes} /dev/zero > {floor_file} && sync {floor_file}"])
        floor_file.unlink()
        keep_best("floor", (read_s + write_s, read_s, write_s))
        keep_best("import", timed([sys.executable, "-c", "import torch"]))
        for nproc in (1, 2):
            keep_best(f"ours{nproc}", ours(nproc))
        keep_best("workers2", ours(2, workers=True))
        if r == 0 and not (same_output(work / "out1", work / "out2") and same_output(work / "out1", work / "outw2")):
            raise SystemExit(f"[{layout}] 1 and 2 processes wrote different bytes ({work}/out1 vs out2, outw2)")
        if not args.skip_nofsync:  # CPU-bound: no waiting for the disk
            keep_best("nofsync1", ours(1, fsync=False))
            keep_best("nofsync2", ours(2, fsync=False, workers=True))
        merged_bytes = du(work / "out1")
        for name in ("out1", "out2", "outw2"):  # keep the disk footprint to inputs + 3 outputs
            shutil.rmtree(work / name)
        print(f"[{layout}] round {r + 1}/{args.repeat}: floor {read_s + write_s:.2f} s, "
              f"ours/1 {best['ours1'][0]:.2f} s, ours/2 {best['ours2'][0]:.2f} s, "
              f"--workers 2 {best['workers2'][0]:.2f} s (best so far)", flush=True)
    if not args.skip_naive:
        shutil.rmtree(work / "naive", ignore_errors=True)
        warm(files, resident)
        best["naive"] = timed([sys.executable, "-c", NAIVE, *map(str, inputs), str(work / "naive")], env)
        shutil.rmtree(work / "naive")
    known = [f for f in resident if f is not None]
    return dict(best=best, resident=min(known) if known else None, in_bytes=in_bytes, out_bytes=out_bytes,
                merged_bytes=merged_bytes, largest=largest, bound=bound, chunks=chunks, nfiles=nfiles, k=len(inputs))


def report(layout: str, res: dict, args) -> None:
    b = res["best"]
    floor, read_s, write_s = b["floor"]
    print(f"\n== {layout}: k={res['k']} x {res['in_bytes'] / res['k'] / GIB:.2f} GiB {args.dtype}, "
          f"largest chunk {res['largest'] / MIB:.0f} MiB; best of {args.repeat} round(s), warm page cache ==")
    head = (f"{'':42s} {'wall s':>7s} {'x floor':>8s} {'engine s':>9s} {'eng x fl':>9s} "
            f"{'RSS MiB/proc':>13s} {'bound MiB':>10s}")
    print(head)

    def row(name, wall, rss=None, engine=None, bound=None):
        cells = [f"{name:42s}", f"{wall:7.2f}", f"{wall / floor:8.2f}",
                 f"{engine:9.2f}" if engine is not None else f"{'':9s}",
                 f"{engine / floor:9.2f}" if engine is not None else f"{'':9s}",
                 f"{rss:13.0f}" if rss is not None else f"{'':13s}",
                 f"{bound:10.0f}" if bound is not None else ""]
        print(" ".join(cells))

    row(f"I/O floor (read {read_s:.2f} + write {write_s:.2f})", floor)
    row("python -c 'import torch' (torchrun ranks)", *b["import"])
    for key, name in (("ours1", "1 process"), ("workers2", "--workers 2 (forked)"), ("ours2", "2 processes (torchrun)")):
        wall, rss, engine = b[key]
        row(f"megatron-pma merge, {name}", wall, rss, engine, res["bound"])
    if "naive" in b:
        row("naive full-load DCP merge", *b["naive"])
    for nproc in (1, 2):
        if f"nofsync{nproc}" in b:
            wall, rss, engine = b[f"nofsync{nproc}"]
            row(f"  same, --no-fsync, {'--workers 2' if nproc > 1 else '1 process'}", wall, rss, engine, res["bound"])
    (w1, r1, e1), (w2, r2, e2), (wt, _, et) = b["ours1"], b["workers2"], b["ours2"]
    ok = lambda c: "yes" if c else "NO"  # noqa: E731
    cached = "unknown" if res["resident"] is None else f"{100 * res['resident']:.1f} %"
    print(f"input {res['in_bytes'] / GIB:.2f} GiB in {res['k'] * res['nfiles']} files (least resident in the page "
          f"cache before a timed run: {cached}), merged output {res['merged_bytes'] / GIB:.2f} GiB; "
          f"1 and 2 processes (forked and torchrun) wrote identical bytes")
    print(f"targets: wall <= 1.5x floor: 1 proc {w1 / floor:.2f}x end to end ({ok(w1 <= 1.5 * floor)}), "
          f"{e1 / floor:.2f}x engine ({ok(e1 <= 1.5 * floor)}); "
          f"peak RSS <= {res['bound']:.0f} MiB: {r1:.0f} / {r2:.0f} MiB ({ok(max(r1, r2) <= res['bound'])}); "
          f"--workers 2 vs 1 with fsync (bound by the disk's write speed): {w1 / w2:.2f}x end to end, "
          f"{e1 / e2:.2f}x engine; "
          f"torchrun x2 vs 1: {w1 / wt:.2f}x end to end, {e1 / et:.2f}x engine")
    if "nofsync1" in b:
        (nw1, _, n1), (nw2, _, n2) = b["nofsync1"], b["nofsync2"]
        # one process already uses a second core where it has one (its write-behind thread), so
        # this is what more processes add, not a scaling of one core to two
        print(f"CPU-bound (--no-fsync): --workers 2 vs 1 process {nw1 / nw2:.2f}x end to end, {n1 / n2:.2f}x engine "
              f"(one process writes on a second thread when it has a spare core)")
    if "naive" in b:
        print(f"naive vs ours/1: {b['naive'][0] / w1:.2f}x the time, {b['naive'][1] / r1:.2f}x the memory")


# ---------------------------------------------------------------------------------------------
# safetensors: Hugging Face checkpoints of one run (python benchmarks/merge_bench.py --safetensors)


SAFETENSORS_SHARDS = 4


def safetensors_inputs(root: Path, k: int, gib: float, dtype: str) -> dict:
    """k ``iter_*`` folders laid out as ``save_pretrained`` shards a model: model-0000j-of-00004
    .safetensors + model.safetensors.index.json (written by ``safetensors.torch.save_file``)."""
    import torch
    from safetensors.torch import save_file

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    hidden = 1024 if gib >= 0.5 else 256
    shape = (4 * hidden, hidden)
    n = max(SAFETENSORS_SHARDS, math.ceil(gib * GIB / (ITEMSIZE[dtype] * math.prod(shape))))
    names = [f"model.layers.{i // 2}.mlp.{'up' if i % 2 == 0 else 'down'}_proj.weight" for i in range(n)]
    files = [f"model-{j + 1:05d}-of-{SAFETENSORS_SHARDS:05d}.safetensors" for j in range(SAFETENSORS_SHARDS)]
    for i in range(k):
        g = torch.Generator().manual_seed(i)
        d = root / f"iter_{(i + 1) * 1000:07d}"
        d.mkdir()
        weight_map = {}
        for j, file in enumerate(files):
            part = names[j::SAFETENSORS_SHARDS]
            save_file({name: torch.randn(shape, generator=g).to(dt) for name in part}, d / file,
                      metadata={"format": "pt"})
            weight_map.update({name: file for name in part})
        index = {"metadata": {"total_size": n * math.prod(shape) * ITEMSIZE[dtype]}, "weight_map": weight_map}
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden}))
    return {"model": f"{n} tensors {list(shape)} in {SAFETENSORS_SHARDS} shards + index, save_pretrained naming"}


BUILDERS["safetensors"] = safetensors_inputs

NAIVE_SAFETENSORS = r"""
import json, os, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
inputs, out = [Path(p) for p in sys.argv[1:-1]], Path(sys.argv[-1])
acc, layout = None, {}
for p in inputs:  # whole checkpoints, one after the other: load_file every shard
    sd = {}
    for f in sorted(p.glob("*.safetensors")):
        part = load_file(f)
        layout[f.name] = list(part)
        sd.update(part)
    if acc is None:
        acc = {k: v.float() / len(inputs) for k, v in sd.items()}
    else:
        for k, v in sd.items():
            acc[k] += v.float() / len(inputs)
    dtypes = {k: v.dtype for k, v in sd.items()}
    del sd
out.mkdir()
for name, keys in layout.items():  # save_file per shard, fsynced like ours
    save_file({k: acc[k].to(dtypes[k]) for k in keys}, out / name, metadata={"format": "pt"})
    fd = os.open(out / name, os.O_RDONLY); os.fsync(fd); os.close(fd)
"""


def bench_safetensors(inputs: list[Path], info: dict, work: Path, args) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    files = data_files(inputs)
    in_bytes = sum(os.path.getsize(f) for f in files)
    out_bytes = du(inputs[-1])
    print(f"[safetensors] k={len(inputs)} x {in_bytes / len(inputs) / GIB:.2f} GiB {args.dtype}: {info['model']}",
          flush=True)
    resident: list = []
    best: dict[str, tuple] = {}

    def ours(nproc: int) -> tuple[float, float, float]:
        out = work / f"st-out{nproc}"
        shutil.rmtree(out, ignore_errors=True)
        warm(files, resident)
        wall, rss = timed([sys.executable, "-m", "megatron_pma", "merge", *map(str, inputs), "--output", str(out),
                           "--quiet", "--workers", str(nproc)], env)
        return wall, rss, json.loads((out / "pma_provenance.json").read_text())["seconds"]

    ours(1)  # warm-up
    for r in range(args.repeat):
        warm(files, resident)
        read_s, _ = timed(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files])
        floor_file = work / "floor.bin"
        write_s, _ = timed(["sh", "-c", f"head -c {out_bytes} /dev/zero > {floor_file} && sync {floor_file}"])
        floor_file.unlink()
        best["floor"] = min(best.get("floor", (math.inf,)), (read_s + write_s, read_s, write_s))
        for nproc in (1, 2):
            v = ours(nproc)
            old = best.get(f"ours{nproc}")
            best[f"ours{nproc}"] = v if old is None else (min(old[0], v[0]), max(old[1], v[1]), min(old[2], v[2]))
        for f in (work / "st-out1").glob("*.safetensors"):
            if not filecmp.cmp(f, work / "st-out2" / f.name, shallow=False):
                raise SystemExit(f"[safetensors] 1 and 2 processes wrote different bytes ({f.name})")
        merged_bytes = du(work / "st-out1")
        shutil.rmtree(work / "st-out1"), shutil.rmtree(work / "st-out2")
        print(f"[safetensors] round {r + 1}/{args.repeat}: floor {best['floor'][0]:.2f} s, ours/1 "
              f"{best['ours1'][0]:.2f} s, --workers 2 {best['ours2'][0]:.2f} s (best so far)", flush=True)
    if not args.skip_naive:
        warm(files, resident)
        best["naive"] = timed([sys.executable, "-c", NAIVE_SAFETENSORS, *map(str, inputs), str(work / "st-naive")], env)
        shutil.rmtree(work / "st-naive")
    known = [f for f in resident if f is not None]
    return dict(best=best, resident=min(known) if known else None, in_bytes=in_bytes, merged_bytes=merged_bytes,
                k=len(inputs), largest=4 * 1024 * 1024 * ITEMSIZE[args.dtype])


def report_safetensors(res: dict, args) -> None:
    b = res["best"]
    floor, read_s, write_s = b["floor"]
    print(f"\n== safetensors: k={res['k']} x {res['in_bytes'] / res['k'] / GIB:.2f} GiB {args.dtype} "
          f"(save_pretrained shards); best of {args.repeat} round(s), warm page cache ==")
    print(f"{'':42s} {'wall s':>7s} {'x floor':>8s} {'engine s':>9s} {'eng x fl':>9s} {'RSS MiB/proc':>13s}")
    rows = [(f"I/O floor (read {read_s:.2f} + write {write_s:.2f})", floor, None, None),
            ("megatron-pma merge, 1 process", b["ours1"][0], b["ours1"][1], b["ours1"][2]),
            ("megatron-pma merge, --workers 2", b["ours2"][0], b["ours2"][1], b["ours2"][2])]
    if "naive" in b:
        rows.append(("naive load_file / average / save_file", b["naive"][0], b["naive"][1], None))
    for name, wall, rss, engine in rows:
        print(f"{name:42s} {wall:7.2f} {wall / floor:8.2f} " + (f"{engine:9.2f} {engine / floor:9.2f} " if engine
              else f"{'':9s} {'':9s} ") + (f"{rss:13.0f}" if rss else ""))
    cached = "unknown" if res["resident"] is None else f"{100 * res['resident']:.1f} %"
    w1 = b["ours1"][0]
    print(f"input {res['in_bytes'] / GIB:.2f} GiB (least resident before a timed run: {cached}), merged output "
          f"{res['merged_bytes'] / GIB:.2f} GiB; 1 and 2 processes wrote identical bytes; target 1 process <= 1.3x "
          f"floor: {w1 / floor:.2f}x end to end ({'yes' if w1 <= 1.3 * floor else 'NO'}), "
          f"{b['ours1'][2] / floor:.2f}x engine" + (f"; naive vs ours/1: {b['naive'][0] / w1:.2f}x the time, "
                                                    f"{b['naive'][1] / b['ours1'][1]:.2f}x the memory" if "naive" in b else ""))


def main_safetensors(args) -> None:
    cache = args.cache.resolve()
    name = f"safetensors-{args.dtype}-{args.gib:g}gib-k{args.k}"
    work = cache / f"work-{os.getpid()}"
    try:
        inputs, info = cached_inputs(cache, "safetensors", args.k, args.gib, args.dtype, args.rebuild,
                                     args.cache_max_gib, {name})
        work.mkdir(parents=True, exist_ok=True)
        res = bench_safetensors(inputs, info, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    print(f"\n{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end")
    report_safetensors(res, args)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", choices=["synthetic", "gpt-tp2", "both"], default="both")
    ap.add_argument("--size-gib", "--gib", dest="gib", type=float, default=1.0,
                    help="minimum size of each input checkpoint (default 1.0)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/pma-bench-cache"),
                    help="where inputs are built once and reused (outputs are written here too, then removed)")
    ap.add_argument("--cache-max-gib", type=float, default=12.0,
                    help="evict least recently used cached inputs to stay under this (default 12)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached inputs")
    ap.add_argument("--repeat", type=int, default=3, help="measurement rounds; the best is reported (default 3)")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip-nofsync", action="store_true", help="skip the CPU-bound (--no-fsync) runs")
    ap.add_argument("--safetensors", action="store_true",
                    help="benchmark Hugging Face safetensors checkpoints instead (k x SIZE, 4 shards + index)")
    args = ap.parse_args()
    if args.safetensors:
        return main_safetensors(args)
    layouts = ["synthetic", "gpt-tp2"] if args.layout == "both" else [args.layout]
    cache = args.cache.resolve()
    names = {f"{lay}-{args.dtype}-{args.gib:g}gib-k{args.k}" for lay in layouts}
    work = cache / f"work-{os.getpid()}"
    results = {}
    try:
        for layout in layouts:
            inputs, info = cached_inputs(cache, layout, args.k, args.gib, args.dtype, args.rebuild,
                                         args.cache_max_gib, names)
            work.mkdir(parents=True, exist_ok=True)
            results[layout] = bench_layout(layout, inputs, info, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    print(f"\n{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end")
    for layout, res in results.items():
        report(layout, res, args)


if __name__ == "__main__":
    main()
