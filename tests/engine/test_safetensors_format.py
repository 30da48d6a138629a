"""The safetensors format: folders of Hugging Face checkpoints of one run, merged file by file.

Inputs are written by the real writers: ``transformers``' ``save_pretrained`` of a tiny
``LlamaForCausalLM`` (sharded with a small ``max_shard_size``: ``model-0000k-of-0000n.safetensors``
+ ``model.safetensors.index.json``) and ``safetensors.torch.save_file`` (one file, bf16, header
metadata, an integer tensor). Outputs are read back by the ``safetensors`` library and by
``from_pretrained``, and compared with a float64 reference merge.
"""

import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import REPO, assert_tensors_close, cli, reference_merge, tree_digest
from megatron_pma import layouts, merge_checkpoints, schedules
from megatron_pma.checkpoint import safetensors_file, writeback
from megatron_pma.errors import PMAError
from megatron_pma.formats import safetensors as safetensors_format
from megatron_pma.layouts import hugging_face

transformers = pytest.importorskip("transformers")
STEPS = (100, 200, 300)


def _llama(seed: int):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # every tensor differs between checkpoints (norms too)
    return model


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory) -> list[Path]:
    """A Trainer-like run: checkpoint-100/200/300, each save_pretrained, sharded."""
    root = tmp_path_factory.mktemp("hf") / "run"
    ckpts = []
    for i, step in enumerate(STEPS):
        d = root / f"checkpoint-{step}"
        _llama(i).save_pretrained(d, max_shard_size="20KB")
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        torch.save({"state": {}, "step": step}, d / "optimizer.pt")  # the Trainer's, unmerged
        ckpts.append(d)
    return ckpts


def _single(root: Path, steps=STEPS, dtype=torch.bfloat16) -> list[Path]:
    out = []
    for i, step in enumerate(steps):
        g = torch.Generator().manual_seed(i)
        d = root / f"step_{step}"
        d.mkdir(parents=True)
        save_file({"w": torch.randn(257, 33, generator=g).to(dtype), "norm": torch.rand(33, generator=g).to(dtype),
                   "half": torch.randn(40, generator=g).half(), "double": torch.randn(9, generator=g).double(),
                   "count": torch.tensor([step, i]), "mask": torch.tensor([True, False])},
                  d / "model.safetensors", metadata={"format": "pt", "saved_at": str(step)})
        out.append(d)
    return out


def _tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_sharded_save_pretrained_run_merges_to_the_reference_and_loads_back(hf_run, tmp_path):
    assert len(list(hf_run[0].glob("model-*-of-*.safetensors"))) > 2  # really sharded
    assert all(layouts.of_checkpoint(c) is hugging_face.LAYOUT for c in hf_run)
    before = [tree_digest(c) for c in hf_run]
    out = tmp_path / "merged"
    r = cli("merge", *reversed(hf_run), "-o", out, "--method", "ema", "--alpha", "0.3", "-q")
    assert r.returncode == 0, r.stderr
    w = schedules.weights("ema", 3, alpha=0.3)
    ref = reference_merge([_tensors(c) for c in hf_run], w)
    merged = _tensors(out)
    assert_tensors_close(merged, ref)
    newest = hf_run[-1]
    # the newest's index, config and other files; its optimizer stays out (recorded)
    assert (out / "model.safetensors.index.json").read_bytes() == (newest / "model.safetensors.index.json").read_bytes()
    assert (out / "config.json").read_bytes() == (newest / "config.json").read_bytes()
    assert (out / "trainer_state.json").exists() and not (out / "optimizer.pt").exists()
    prov = json.loads((out / "pma_provenance.json").read_text())
    assert prov["format"] == "safetensors" and [i["iteration"] for i in prov["inputs"]] == list(STEPS)
    assert "optimizer.pt" in prov["left_out"]
    for rel in (p.name for p in newest.glob("*.safetensors")):  # headers (and __metadata__) are the newest's
        with safe_open(out / rel, "pt") as a, safe_open(newest / rel, "pt") as b:
            assert a.metadata() == b.metadata() and list(a.keys()) == list(b.keys())
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    sd = model.state_dict()
    for k, v in merged.items():
        assert torch.equal(sd[k], v), k
    assert [tree_digest(c) for c in hf_run] == before  # inputs untouched


def test_single_file_bf16_with_metadata_and_integers(tmp_path):
    ckpts = _single(tmp_path / "run", steps=(5, 50, 500))  # headers of different lengths
    (tmp_path / "blobs").mkdir()  # a Hugging Face cache snapshot: files are relative links into blobs/
    (tmp_path / "blobs" / "cfg").write_text('{"model_type": "llama"}')
    (ckpts[-1] / "config.json").symlink_to("../../blobs/cfg")
    out = tmp_path / "out"
    r = cli("merge", *ckpts, "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    ins = [load_file(c / "model.safetensors") for c in ckpts]
    merged = load_file(out / "model.safetensors")
    assert_tensors_close(merged, reference_merge(ins, [1 / 3] * 3))
    assert torch.equal(merged["count"], ins[-1]["count"]) and torch.equal(merged["mask"], ins[-1]["mask"])
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "saved_at": "500"}
    assert (out / "model.safetensors").stat().st_size == (ckpts[-1] / "model.safetensors").stat().st_size
    assert not (out / "config.json").is_symlink() and (out / "config.json").read_text() == '{"model_type": "llama"}'


def test_workers_write_the_same_bytes_and_save_dir_picks_the_window(hf_run, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("merge", "--save-dir", hf_run[0].parent, "--num-models", "2", "-o", a, "-q",
               env={"MEGATRON_PMA_WORKERS": "1"}).returncode == 0
    r = cli("merge", *hf_run[1:], "-o", b, "-q", "--workers", "3")
    assert r.returncode == 0, r.stderr
    for f in a.glob("*.safetensors"):
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    assert [i["iteration"] for i in json.loads((a / "pma_provenance.json").read_text())["inputs"]] == [200, 300]


def test_the_merge_never_imports_torch(tmp_path):
    ckpts = _single(tmp_path / "run")
    code = ("import sys; sys.modules['torch'] = None\n"
            "from megatron_pma.merge import merge_checkpoints\n"
            f"merge_checkpoints({[str(c) for c in ckpts]!r}, {str(tmp_path / 'out')!r}, progress=False)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written, inputs untouched


def _rewrite_header(file: Path, edit) -> None:
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _other_name(ckpts):
    f = ckpts[0] / "model.safetensors"
    t = load_file(f)
    t["w2"] = t.pop("w")
    save_file(t, f, metadata={"format": "pt"})
    return "missing key w "


def _other_shape(ckpts):
    f = ckpts[0] / "model.safetensors"
    t = load_file(f)
    t["norm"] = t["norm"][:32].clone()
    save_file(t, f)
    return "key norm has shape [32]"


def _other_dtype(ckpts):
    f = ckpts[0] / "model.safetensors"
    t = load_file(f)
    t["norm"] = t["norm"].float()
    save_file(t, f)
    return "key norm has dtype float32"


def _header_past_end(ckpts):
    f = ckpts[1] / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 10 ** 6) + f.read_bytes()[8:100])
    return "truncated (header length 1000000 runs past the end"


def _data_past_end(ckpts):
    f = ckpts[1] / "model.safetensors"
    os.truncate(f, f.stat().st_size - 10)
    return "truncated (key"


def _not_json(ckpts):
    f = ckpts[2] / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8] = ord("x")
    f.write_bytes(bytes(data))
    return "header is not valid JSON"


def _missing_shard(ckpts):
    index = {"metadata": {"total_size": 1}, "weight_map": {"w": "model-00002-of-00002.safetensors"}}
    (ckpts[1] / "model.safetensors.index.json").write_text(json.dumps(index))
    return "names shard model-00002-of-00002.safetensors (for w), which is missing"


def _no_number(ckpts):
    ckpts[0].rename(ckpts[0].parent / "best")
    ckpts[0] = ckpts[0].parent / "best"
    return "cannot tell its step"


def _holed(ckpts):
    _rewrite_header(ckpts[0] / "model.safetensors",
                    lambda h: h["mask"].update(data_offsets=[h["mask"]["data_offsets"][0] + 1,
                                                             h["mask"]["data_offsets"][1] + 1]))
    return "key mask"


def _nan(ckpts):
    f = ckpts[1] / "model.safetensors"
    t = load_file(f)
    t["w"][3, 4] = float("nan")
    save_file(t, f, metadata={"format": "pt", "saved_at": "200"})
    return "step_200/model.safetensors: key w holds NaN/Inf (pass --allow-nonfinite"


@pytest.mark.parametrize("breaker", [_nan, _other_name, _other_shape, _other_dtype, _header_past_end, _data_past_end,
                                     _not_json, _missing_shard, _no_number, _holed])
def test_bad_input_is_one_line_and_exit_2(breaker, tmp_path):
    ckpts = _single(tmp_path / "run")
    expected = breaker(ckpts)
    before = {c: tree_digest(c) for c in ckpts}
    out = tmp_path / "out"
    r = cli("merge", *ckpts, "-o", out, "-q")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert {c: tree_digest(c) for c in ckpts} == before


def test_optimizer_modes_other_than_drop_are_refused(hf_run, tmp_path):
    r = cli("merge", *hf_run, "-o", tmp_path / "out", "--optimizer", "average", "-q")
    assert r.returncode == 2 and "use --optimizer drop" in r.stderr and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# The reader on damaged files: a one-line PMAError, never another exception



@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> bytes:
    f = tmp_path_factory.mktemp("st") / "model.safetensors"
    save_file({"w": torch.arange(12, dtype=torch.float32).view(3, 4), "n": torch.tensor([1, 2]),
               "h": torch.ones(5, dtype=torch.bfloat16)}, f, metadata={"format": "pt"})
    return f.read_bytes()


@given(cut=st.integers(min_value=0, max_value=10 ** 6))
def test_every_proper_prefix_is_refused_as_truncated(small_file, tmp_path_factory, cut):
    cut %= len(small_file)
    f = tmp_path_factory.mktemp("cut") / "model.safetensors"
    f.write_bytes(small_file[:cut])
    with pytest.raises(PMAError, match="truncated"):
        safetensors_file.read_header(f)


@given(pos=st.integers(min_value=8, max_value=10 ** 6), byte=st.integers(min_value=0, max_value=255))
def test_a_damaged_header_reads_or_is_refused_in_one_line(small_file, tmp_path_factory, pos, byte):
    (n,) = struct.unpack("<Q", small_file[:8])
    pos = 8 + (pos - 8) % n
    data = bytearray(small_file)
    data[pos] = byte
    f = tmp_path_factory.mktemp("bad") / "model.safetensors"
    f.write_bytes(bytes(data))
    try:
        read = safetensors_file.read_header(f)
    except PMAError as e:
        assert "\n" not in str(e) and str(f) in str(e)
    else:  # still a valid file: every tensor inside it
        assert all(t.offset + t.nbytes <= len(data) for t in read.tensors.values())


# ---------------------------------------------------------------------------------------------
# With --save-dtype, --order given, --output-iteration (the options of issue 17)


@pytest.mark.parametrize("save_dtype", ["input", "bf16"])
def test_a_lagging_file_write_never_gets_the_next_files_bytes(hf_run, tmp_path, monkeypatch, save_dtype):
    """Regression: repeating the suite once produced a --save-dtype bf16 merge in which a tensor
    held another tensor's merged bytes (the writer had a thread per output file, and the next
    file's slabs reused a buffer still queued for the previous one). Here the writer thread's
    writes to the first output file wait 0.2 s each, so the merge moves on to the next files while
    they are pending; the output must still be the reference. The hold only makes that bug
    certain to show: the check itself does not depend on the timing."""
    first_fd, real_pwrite = [], os.pwrite

    def lagging(fd, data, pos):
        if threading.current_thread().name == "pma-write-behind":
            first_fd[:] = first_fd or [fd]
            if fd == first_fd[0]:
                threading.Event().wait(0.2)
        return real_pwrite(fd, data, pos)

    monkeypatch.setattr(writeback.os, "pwrite", lagging)
    monkeypatch.setattr(safetensors_format, "SLAB_ELEMENTS", 1024)  # several slabs per tensor
    out = tmp_path / "merged"
    merge_checkpoints(hf_run, out, save_dtype=save_dtype, threads=2, workers=1, progress=False, fsync=False)
    assert first_fd, "the merge did not write through the writer thread"
    ref = reference_merge([_tensors(c) for c in hf_run], [1 / 3] * 3)
    if save_dtype == "bf16":
        ref = {k: v.to(torch.bfloat16) for k, v in ref.items()}
    assert_tensors_close(_tensors(out), ref)


def test_save_dtype_rewrites_headers_and_index_sizes(hf_run, tmp_path):
    out = tmp_path / "bf16"
    r = cli("merge", *hf_run, "-o", out, "--save-dtype", "bf16", "-q")
    assert r.returncode == 0, r.stderr
    ref = {k: v.to(torch.bfloat16) for k, v in reference_merge([_tensors(c) for c in hf_run], [1 / 3] * 3).items()}
    merged = _tensors(out)
    assert {v.dtype for v in merged.values()} == {torch.bfloat16}
    assert_tensors_close(merged, ref)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in merged.values())
    assert index["weight_map"] == json.loads((hf_run[-1] / "model.safetensors.index.json").read_text())["weight_map"]
    for f in out.glob("*.safetensors"):  # headers keep the newest's metadata
        with safe_open(f, "pt") as a, safe_open(hf_run[-1] / f.name, "pt") as b:
            assert a.metadata() == b.metadata()
    sd = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    for k, v in merged.items():
        assert torch.equal(sd[k], v), k


def test_save_dtype_fp32_widens_bf16_and_keeps_integers(tmp_path):
    ckpts = _single(tmp_path / "run")
    out = tmp_path / "out"
    assert cli("merge", *ckpts, "-o", out, "--save-dtype", "fp32", "-q").returncode == 0
    ins = [load_file(c / "model.safetensors") for c in ckpts]
    merged = load_file(out / "model.safetensors")
    assert merged["w"].dtype == torch.float32 and merged["double"].dtype == torch.float32
    assert merged["count"].dtype == torch.int64 and torch.equal(merged["count"], ins[-1]["count"])
    ref = sum(x["w"].double() for x in ins) / 3
    torch.testing.assert_close(merged["w"].double(), ref, rtol=1e-6, atol=1e-6)


def test_order_given_takes_folders_without_numbers(tmp_path):
    ckpts = _single(tmp_path / "run")
    named = []
    for c, name in zip(ckpts, ("first", "second", "third")):
        c.rename(c.parent / name)
        named.append(c.parent / name)
    out = tmp_path / "out"
    r = cli("merge", *named, "-o", out, "--order", "given", "--method", "custom", "--weights", "0.2,0.3,0.5", "-q")
    assert r.returncode == 0, r.stderr
    ins = [load_file(c / "model.safetensors") for c in named]
    assert_tensors_close(load_file(out / "model.safetensors"), reference_merge(ins, [0.2, 0.3, 0.5]))
    r = cli("merge", *named, "-o", tmp_path / "out2", "-q")
    assert r.returncode == 2 and "or pass --order given" in r.stderr
