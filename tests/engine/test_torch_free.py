"""The torch_dist merge runs without importing torch (it costs 1.5-2 s per process): DCP metadata
stand-ins that re-pickle byte for byte, numpy slab arithmetic that rounds exactly like torch, and
a real CLI merge in a process where `import torch` fails."""

import io
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt_factory
from helpers import REPO, assert_tensors_close, reference_merge
from megatron_pma import schedules, slab_math
from megatron_pma.checkpoint import dcp_types

NO_TORCH = "import sys; sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"


def _metadata_files(dirs):
    return [d / ".metadata" for d in dirs]


@pytest.mark.parametrize("fixture", ["gpt_tp2", "gpt_tp2_pp2", "gpt_tp2_distopt", "gpt_bf16", "gpt_mcore014",
                                     "gpt_mcore0192"])
def test_real_metadata_round_trips_byte_for_byte(fixture, request):
    """Megatron's .metadata (0.14 MCoreMetadata, 0.16, 0.19; save plans, bucket keys) loads into the
    stand-ins and pickles back to the very same bytes; torch reads our pickle as its own classes."""
    import torch.distributed.checkpoint  # noqa: F401  (registers torch's classes for pickle.loads)
    from torch.distributed.checkpoint.metadata import Metadata

    for md_file in _metadata_files(request.getfixturevalue(fixture)):
        data = md_file.read_bytes()
        ours = dcp_types.loads(data)
        assert dcp_types.dumps(ours) == data, md_file
        theirs = pickle.loads(dcp_types.dumps(ours))
        assert isinstance(theirs, Metadata)
        assert theirs == pickle.loads(data)


def test_new_metadata_objects_pickle_as_torch_classes():
    """What the merge builds (fresh index / storage entries) reads back as torch's own objects."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    idx = dcp_types.MetadataIndex("decoder.weight", (0, 64))
    md = dcp_types.Metadata({}, planner_data={"decoder.weight": ("decoder.weight",)},
                            storage_data={idx: dcp_types.StorageInfo("__0_0.distcp", 128, 4096)})
    back = pickle.loads(dcp_types.dumps(md))
    (key, info), = back.storage_data.items()
    assert key == MetadataIndex("decoder.weight", torch.Size([0, 64])) and type(key.offset) is torch.Size
    assert type(info) is _StorageInfo and (info.relative_path, info.offset, info.length) == ("__0_0.distcp", 128, 4096)
    assert dcp_types.DType.get("bfloat16") == torch.bfloat16 and dcp_types.float32 != torch.float16


def test_cli_merge_with_torch_unimportable(gpt_tp2_distopt, tmp_path):
    """A real TP=2 distributed-optimizer run merged (optimizer averaged) by the CLI in a process
    that cannot import torch; the output equals the float64 reference and loads with plain DCP."""
    out = tmp_path / "merged"
    code = NO_TORCH + ("from megatron_pma.cli import main\n"
                       f"sys.exit(main(['merge', *{[str(p) for p in gpt_tp2_distopt]!r}, '--output', {str(out)!r},"
                       " '--optimizer', 'average', '--workers', '2', '--quiet']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    tensors = [ckpt_factory.load_full_tensors(p) for p in gpt_tp2_distopt]
    ref = reference_merge(tensors, schedules.sma(len(tensors)))
    assert_tensors_close(ckpt_factory.load_full_tensors(out), ref)


FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(FLOATS, min_size=1, max_size=300))
def test_bf16_and_fp16_rounding_match_torch(values):
    """narrow() rounds fp32 -> bf16 / fp16 bit for bit as torch's .to() does (ties, subnormals,
    overflow to inf, NaN); widen() is exact."""
    acc = np.array(values, dtype=np.float32)
    ties = (acc.view(np.uint32) & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # exactly halfway cases
    acc = np.concatenate([acc, ties.view(np.float32)])
    tmp = np.empty(acc.size, dtype=np.uint32)
    for name, raw_t in (("bfloat16", np.uint16), ("float16", np.float16)):
        dtype = dcp_types.DType.get(name)
        out = np.empty(acc.size, dtype=raw_t)
        with np.errstate(over="ignore", invalid="ignore"):
            slab_math.narrow(acc, dtype, out, tmp, finite=bool(np.isfinite(acc).all()))
        want = torch.from_numpy(acc.copy()).to(dtype.torch)
        wide = slab_math.widen(out, dtype, np.empty(acc.size, dtype=np.float32))
        nan = np.isnan(acc)  # NaN stays NaN (torch's own bit pattern differs between its kernels)
        assert np.array_equal(np.isnan(wide), nan), name
        bits = out.view(np.uint16)[~nan].tobytes()
        assert bits == want.view(torch.int16).numpy()[~nan].tobytes(), name
        assert wide[~nan].tobytes() == want.float().numpy()[~nan].tobytes()


def test_fp8_chunks_are_refused_not_averaged():
    assert not slab_math.supported(dcp_types.DType.get("float8_e4m3fn"))
    assert all(slab_math.supported(dcp_types.DType.get(n)) for n in ("float32", "bfloat16", "float16", "float64"))


def test_merge_modules_import_without_torch():
    code = ("import sys\nimport megatron_pma.cli, megatron_pma.merge, megatron_pma.commands.merge, "
            "megatron_pma.commands.inspect, megatron_pma.checkpoint.discovery, megatron_pma.parallel\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_common_state_reads_without_torch(gpt_tp2, gpt_mcore0192, tmp_path):
    """common.pt (<= 0.18) and the in-DCP common state (0.19) give iteration and args without torch."""
    code = NO_TORCH + ("from megatron_pma.checkpoint.common_state import read_common_state\n"
                       "from pathlib import Path\n"
                       "for p in sys.argv[1:]:\n"
                       "    s = read_common_state(Path(p))\n"
                       "    print(s['iteration'], s['args'].seq_length)\n")
    paths = [str(gpt_tp2[-1]), str(gpt_mcore0192[-1])]
    r = subprocess.run([sys.executable, "-c", code, *paths], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    want = [torch.load(io.BytesIO((gpt_tp2[-1] / "common.pt").read_bytes()), weights_only=False)]
    lines = r.stdout.split("\n")
    assert lines[0] == f"{want[0]['iteration']} {want[0]['args'].seq_length}"
    assert lines[1].split()[0] == str(ckpt_factory.read_common_any(gpt_mcore0192[-1])["iteration"])


def test_tensor_properties_of_older_torch_keep_their_form():
    """torch < 2.1 pickled TensorProperties as its __dict__ (no memory-format enum): still readable
    (dtype) and written back in the same form."""
    old = dcp_types.TensorProperties.__new__(dcp_types.TensorProperties)
    old._state = {"dtype": dcp_types.bfloat16, "layout": dcp_types.standin_class("torch", "strided"),
                  "requires_grad": False, "memory_format": dcp_types.standin_class("torch", "contiguous_format"),
                  "pin_memory": False}
    data = dcp_types.dumps(old)
    back = dcp_types.loads(data)
    assert back.dtype is dcp_types.bfloat16 and dcp_types.dumps(back) == data


def test_zip64_sized_chunks_fall_back_to_torch_save(gpt_tp2, tmp_path, monkeypatch):
    """A chunk whose blob would need ZIP64 (> 4 GiB) is assembled and written by torch.save itself;
    with the limit lowered so that every chunk takes that path, the output is byte-identical."""
    from megatron_pma.checkpoint import torch_zip
    from megatron_pma.merge import merge_checkpoints

    merge_checkpoints(gpt_tp2, tmp_path / "streamed", progress=False, fsync=False)
    monkeypatch.setattr(torch_zip, "_ZIP32_LIMIT", 0)
    merge_checkpoints(gpt_tp2, tmp_path / "torch_save", progress=False, fsync=False)
    names = sorted(p.name for p in (tmp_path / "streamed").iterdir() if p.name != "pma_provenance.json")
    assert names == sorted(p.name for p in (tmp_path / "torch_save").iterdir() if p.name != "pma_provenance.json")
    for name in names:
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "torch_save" / name).read_bytes(), name


def test_strided_blobs_are_read_through_torch_load(gpt_tp2, tmp_path, monkeypatch):
    """A chunk whose blob stores a strided view is loaded once with torch.load and sliced per
    slab; forcing that path for every chunk gives the same bytes."""
    import dataclasses

    from megatron_pma.checkpoint import dcp
    from megatron_pma.merge import merge_checkpoints

    merge_checkpoints(gpt_tp2, tmp_path / "direct", progress=False, fsync=False)
    located = dcp.locate_tensor
    monkeypatch.setattr(dcp, "locate_tensor", lambda *a: dataclasses.replace(located(*a), contiguous=False))
    merge_checkpoints(gpt_tp2, tmp_path / "loaded", progress=False, fsync=False)
    for f in (tmp_path / "direct").iterdir():
        if f.name != "pma_provenance.json":
            assert f.read_bytes() == (tmp_path / "loaded" / f.name).read_bytes(), f.name
