"""Merge throughput and memory vs the I/O floor and a naive full-load DCP merge (not a test).

    python benchmarks/merge_bench.py [--gib 1.0] [--k 4] [--dtype fp32] [--workdir DIR]

Builds k synthetic checkpoints of ~GIB each with a GPT-like torch_dist layout (stacked layer
keys, TP=2-style chunks, embedding/output, byte objects, metadata.json + common.pt), then, in the
same run and with a warm page cache:
  floor   read every input byte (cat > /dev/null) + write the output bytes (with fsync)
  ours/1  `python -m megatron_pma merge` with one process
  ours/2  the same under torchrun --nproc_per_node 2
  naive   plain DCP: load every input's full state dict, average, dcp.save
and prints wall seconds, peak RSS per process, and ratios to the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_inputs(root: Path, k: int, gib: float, dtype: str) -> list[Path]:
    import torch
    import torch.distributed.checkpoint as dcp

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    itemsize = torch.empty((), dtype=dt).element_size()
    hidden, vocab = 1024, 32768
    per_layer = 12 * hidden * hidden  # qkv + proj + fc1 + fc2 (4x MLP)
    layers = max(1, int((gib * 2**30 / itemsize - 2 * vocab * hidden) // per_layer))
    dirs = []
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
        dirs.append(d)
        del sd
    (root / "latest_checkpointed_iteration.txt").write_text(str(k * 1000))
    return dirs


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed(cmd: list[str], env=None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of the largest process the command ran."""
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pma-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        t = time.perf_counter()
        inputs = build_inputs(work / "save", args.k, args.gib, args.dtype)
        in_bytes = sum(du(d) for d in inputs)
        print(f"built {args.k} x {in_bytes / args.k / 2**30:.2f} GiB ({args.dtype}) in {time.perf_counter() - t:.0f} s")
        # warm the page cache, then the I/O floor: read everything, write one checkpoint's bytes
        subprocess.run(["cat", *[str(f) for d in inputs for f in d.iterdir()]], stdout=subprocess.DEVNULL)
        read_s, _ = timed(["sh", "-c", "cat " + " ".join(str(f) for d in inputs for f in d.iterdir()) + " > /dev/null"])
        out_bytes = du(inputs[-1])
        write_s, _ = timed(["sh", "-c", f"head -c {out_bytes} /dev/zero > {work}/floor.bin && sync -f {work}/floor.bin"])
        import_s, import_rss = timed([sys.executable, "-c", "import torch"])
        floor = read_s + write_s
        rows = [("I/O floor (read all + write 1, fsync)", floor, None), ("python -c 'import torch'", import_s, import_rss)]

        def ours(nproc: int):
            out = work / f"out{nproc}"
            shutil.rmtree(out, ignore_errors=True)
            merge = ["-m", "megatron_pma", "merge", *map(str, inputs), "--output", str(out), "--quiet"]
            cmd = [sys.executable, *merge] if nproc == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *merge]
            return timed(cmd, env)

        engine = {}
        for nproc in (1, 2):
            ours(nproc)  # warm-up (page cache for outputs' directory, imports)
            wall, rss = ours(nproc)
            rows.append((f"megatron-pma merge, {nproc} process{'es' if nproc > 1 else ''}", wall, rss))
            # the engine's own time (after imports and process start-up), from its provenance
            engine[nproc] = json.loads((work / f"out{nproc}" / "pma_provenance.json").read_text())["seconds"]
        if not args.skip_naive:
            shutil.rmtree(work / "naive", ignore_errors=True)
            wall, rss = timed([sys.executable, "-c", NAIVE, *map(str, inputs), str(work / "naive")], env)
            rows.append(("naive full-load DCP merge", wall, rss))
        print(f"\n{'':44s} {'wall s':>8s} {'x floor':>8s} {'x (floor+import)':>17s} {'peak RSS MiB':>13s}")
        for name, wall, rss in rows:
            print(f"{name:44s} {wall:8.2f} {wall / floor:8.2f} {wall / (floor + import_s):17.2f} "
                  f"{'' if rss is None else f'{rss:13.0f}'}")
        one = next(w for n, w, _ in rows if n.endswith("1 process"))
        two = next(w for n, w, _ in rows if n.endswith("2 processes"))
        print(f"\n2 processes vs 1: {one / two:.2f}x faster end to end, {engine[1] / engine[2]:.2f}x in the "
              f"engine ({engine[1]:.2f} s vs {engine[2]:.2f} s, start-up excluded); engine vs floor "
              f"{engine[1] / floor:.2f}x; input {in_bytes / 2**30:.2f} GiB, output {out_bytes / 2**30:.2f} GiB")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
