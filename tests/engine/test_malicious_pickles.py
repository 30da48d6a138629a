"""A checkpoint cannot run code on the machine that merges, inspects or watches it.

Each malicious checkpoint is a copy of a real fixture run with ONE pickle rewritten to run a
command that creates a sentinel file. Every entry point must refuse it: exit 2, one line naming
the file and the offending ``module.name``, no sentinel, nothing written. And the other side:
every pickle of every real fixture passes the allowlist (``tests/pickle_globals.py`` walks them).
"""

from __future__ import annotations

import datetime
import functools
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckpt_factory
import pickle_globals
from helpers import cli, tree_digest
from megatron_pma.checkpoint import dcp, dcp_types, safe_pickle, torch_pickle
from megatron_pma.checkpoint.dcp_types import BytesStorageMetadata


@pytest.fixture(autouse=True)
def _untrusted(monkeypatch):
    monkeypatch.setenv(safe_pickle.TRUST_ENV, "0")  # also restores it after cli.main(--trust-pickles)


# ----------------------------------------------------------------------------- payloads


class Call:
    """Pickles as ``func(*args)``; ``func`` may itself be a Call (a chain)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __call__(self, *args):  # pickle wants the reduce's callable to be callable
        raise AssertionError("never called here")

    def __reduce__(self):
        return self.func, self.args


class ReduceEx:
    """Hides the call behind ``__reduce_ex__`` and a ``functools.partial``."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce_ex__(self, protocol):
        return functools.partial(subprocess.call, ["touch", str(self.sentinel)]), ()


PAYLOADS = {  # name -> (payload for a sentinel path, the global the refusal names)
    "eval": (lambda s: Call(eval, f"open({str(s)!r}, 'w').close()"), "builtins.eval"),
    "exec": (lambda s: Call(exec, f"open({str(s)!r}, 'w').close()"), "builtins.exec"),
    "os.system": (lambda s: Call(os.system, f"touch {s}"), f"{os.system.__module__}.system"),
    "subprocess.Popen": (lambda s: Call(subprocess.Popen, ["touch", str(s)]), "subprocess.Popen"),
    "getattr chain": (lambda s: Call(Call(getattr, Call(__import__, "os"), "system"), f"touch {s}"),
                      "builtins.getattr"),
    "__reduce_ex__ partial": (lambda s: ReduceEx(s), "functools.partial"),
}


# ----------------------------------------------------------------------------- where it is planted


def _plant_metadata(ckpts, evil):
    f = ckpts[-1] / dcp.METADATA_FILE
    md = dcp_types.loads(f.read_bytes())
    md.planner_data = {**(md.planner_data or {}), "evil": evil}
    f.write_bytes(dcp_types.dumps(md))
    return f


def _rewrite_common(ckpts, change):
    f = ckpts[-1] / dcp.COMMON_FILE
    state = torch.load(f, weights_only=False)
    change(state)
    torch.save(state, f)
    return f


def _plant_common(ckpts, evil):
    return _rewrite_common(ckpts, lambda s: s.__setitem__("evil", evil))


def _plant_args(ckpts, evil):
    return _rewrite_common(ckpts, lambda s: setattr(s["args"], "evil", evil))


def _train_state(**extra):
    """Megatron-Bridge's train_state.pt: a dict of 0-d tensors (training/state.py)."""
    state = {"step": torch.tensor(30), "consumed_train_samples": torch.tensor(120),
             "skipped_train_samples": torch.tensor(0), "consumed_valid_samples": torch.tensor(0),
             "floating_point_operations_so_far": torch.tensor(1.5e9, dtype=torch.float64),
             "do_train": torch.tensor(True), "do_valid": torch.tensor(False), "do_test": torch.tensor(False)}
    return {**state, **extra}


def _plant_train_state(ckpts, evil):
    f = ckpts[-1] / "train_state.pt"
    torch.save(_train_state(evil=evil), f)
    return f


def _te_tensor(evil):
    """Transformer Engine >= 2.0's _extra_state: ``pickle.dumps(state)`` in a uint8 tensor, which
    its ``set_extra_state`` unpickles (transformer_engine/pytorch/module/base.py)."""
    return torch.frombuffer(bytearray(pickle.dumps(evil)), dtype=torch.uint8)


def _te_bytes_io(evil):
    """Transformer Engine < 2.0's _extra_state: a torch.save in an io.BytesIO, torch.load-ed back."""
    blob = io.BytesIO()
    torch.save({"extra_fp8_variables": {}, "evil": evil}, blob)
    return io.BytesIO(blob.getvalue())


def _plant_byte_object(ckpts, evil):
    """Point the newest checkpoint's rng_state byte object at a malicious torch.save blob."""
    ck = ckpts[-1]
    md = dcp_types.loads((ck / dcp.METADATA_FILE).read_bytes())
    idx, info = next((i, v) for i, v in md.storage_data.items()
                     if isinstance(md.state_dict_metadata[i.fqn], BytesStorageMetadata))
    blob = io.BytesIO()
    torch.save(evil, blob)
    f = ck / info.relative_path
    info.offset, info.length = f.stat().st_size, len(blob.getvalue())
    with open(f, "ab") as out:
        out.write(blob.getvalue())
    (ck / dcp.METADATA_FILE).write_bytes(dcp_types.dumps(md))
    return f


def _plant_legacy(ckpts, evil, change=lambda obj, evil: obj.__setitem__("evil", evil)):
    f = ckpts[-1] / "mp_rank_00" / "model_optim_rng.pt"
    obj, codec = torch_pickle.load(f, mmap=False)
    change(obj, evil)
    codec.save(obj, f.with_suffix(".tmp"))
    os.replace(f.with_suffix(".tmp"), f)
    return f


PLACES = {  # name -> (fixture, plant)
    ".metadata": ("gpt_tp2", _plant_metadata),
    "common.pt": ("gpt_tp2", _plant_common),
    "args": ("gpt_tp2", _plant_args),
    "train_state.pt": ("gpt_tp2", _plant_train_state),
    "byte object": ("gpt_tp2", _plant_byte_object),
    "model_optim_rng.pt": ("legacy_bf16", _plant_legacy),
    # a pickle inside the bytes of a byte object / tensor that Transformer Engine unpickles
    "TE extra state, uint8 tensor": ("gpt_tp2", lambda ckpts, evil: _plant_byte_object(ckpts, _te_tensor(evil))),
    "TE extra state, BytesIO": ("gpt_tp2", lambda ckpts, evil: _plant_byte_object(ckpts, _te_bytes_io(evil))),
    "legacy TE extra state": ("legacy_bf16", lambda ckpts, evil: _plant_legacy(ckpts, _te_tensor(evil), lambda obj, t: (
        obj["model"].__setitem__("decoder.layers.0.self_attention.linear_proj._extra_state", t)))),
}


def _malicious_run(request, tmp_path, place, payload):
    fixture, plant = PLACES[place]
    ckpts = ckpt_factory.copy_run(request.getfixturevalue(fixture), tmp_path / "save")
    sentinel = tmp_path / "SENTINEL"
    make, global_name = PAYLOADS[payload]
    planted = plant(ckpts, make(sentinel))
    return ckpts, sentinel, planted, global_name


def _main(capsys, *argv) -> tuple[int, list[str]]:
    from megatron_pma.cli import main

    rc = main([str(a) for a in argv])
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _assert_refused(rc, lines, planted: Path, global_name: str, sentinel: Path):
    assert rc == 2, lines
    assert len(lines) == 1, lines
    assert planted.name in lines[0] and global_name in lines[0] and "--trust-pickles" in lines[0], lines
    assert not sentinel.exists()


# ----------------------------------------------------------------------------- merge / inspect


@pytest.mark.parametrize("place", list(PLACES))
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_merge_refuses(payload, place, request, tmp_path, capsys):
    ckpts, sentinel, planted, global_name = _malicious_run(request, tmp_path, place, payload)
    before = tree_digest(tmp_path)
    rc, lines = _main(capsys, "merge", *ckpts, "-o", tmp_path / "out")
    _assert_refused(rc, lines, planted, global_name, sentinel)
    assert tree_digest(tmp_path) == before  # nothing written (no output, no staging), inputs untouched
    assert sorted(os.listdir(tmp_path)) == ["save"]


@pytest.mark.parametrize("place", list(PLACES))
def test_inspect_refuses(place, request, tmp_path, capsys):
    ckpts, sentinel, planted, global_name = _malicious_run(request, tmp_path, place, "eval")
    rc, lines = _main(capsys, "inspect", ckpts[-1])
    _assert_refused(rc, lines, planted, global_name, sentinel)


@pytest.mark.parametrize("place", ["common.pt", ".metadata", "byte object", "model_optim_rng.pt"])
def test_watch_once_refuses(place, request, tmp_path):
    ckpts, sentinel, planted, global_name = _malicious_run(request, tmp_path, place, "os.system")
    save = ckpts[-1].parent
    r = cli("watch", "--save-dir", save, "--num-models", 3, "--once")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2, r.stderr
    assert last.startswith("megatron-pma watch: error:") and planted.name in last and global_name in last, r.stderr
    assert not sentinel.exists()
    assert not list((save / "pma").glob("*iter_*")) if (save / "pma").exists() else True


def test_watch_refuses_what_it_reads_itself(request, tmp_path):
    """--interval-tokens: the watcher reads each checkpoint's common state (args) to space the
    window, before any merge process: the refusal stops it there."""
    ckpts, sentinel, planted, global_name = _malicious_run(request, tmp_path, "args", "eval")
    save = ckpts[-1].parent
    r = cli("watch", "--save-dir", save, "--num-models", 2, "--interval-tokens", 1, "--once")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and planted.name in last and global_name in last, r.stderr
    assert not sentinel.exists() and not (save / "pma").exists()


def test_hook_records_refusal_and_training_goes_on(gpt_tp2, tmp_path):
    from megatron_pma.training import PMAHook

    ckpts = ckpt_factory.copy_run(gpt_tp2, tmp_path / "save")
    sentinel = tmp_path / "SENTINEL"
    _plant_args(ckpts, PAYLOADS["eval"][0](sentinel))
    hook = PMAHook(ckpts[-1].parent, 3, output_root=tmp_path / "pma")
    try:
        hook.on_checkpoint_saved(30)  # returns at once: training goes on while the child merges
        assert hook.wait(timeout=120)
    finally:
        hook.close()
    (rec,) = hook.results
    assert rec.status == "failed" and "builtins.eval" in rec.error and "common.pt" in rec.error, rec
    assert not sentinel.exists() and not list((tmp_path / "pma").glob("*iter_*"))


def _plant_tensor_blob(ckpt: Path, evil) -> Path:
    """Point one tensor chunk of ``ckpt`` at a torch.save blob of ``evil``."""
    md = dcp_types.loads((ckpt / dcp.METADATA_FILE).read_bytes())
    idx, info = next((i, v) for i, v in md.storage_data.items() if i.fqn == "output_layer.weight")
    blob = io.BytesIO()
    torch.save(evil, blob)
    f = ckpt / info.relative_path
    info.offset, info.length = f.stat().st_size, len(blob.getvalue())
    with open(f, "ab") as out:
        out.write(blob.getvalue())
    (ckpt / dcp.METADATA_FILE).write_bytes(dcp_types.dumps(md))
    return f


@pytest.mark.parametrize("inputs", [1, 3], ids=["copied", "merged"])
def test_tensor_blob_refused(inputs, gpt_tp2, tmp_path, capsys):
    """A chunk copied verbatim (one input: nothing is averaged) is checked while planning; an
    averaged one when it is read. Either way: exit 2, the line, no output, no staging folder."""
    ckpts = ckpt_factory.copy_run(gpt_tp2, tmp_path / "save")[-inputs:]
    sentinel = tmp_path / "SENTINEL"
    planted = _plant_tensor_blob(ckpts[-1], PAYLOADS["eval"][0](sentinel))
    before = tree_digest(tmp_path)
    single = ["--allow-single"] if inputs == 1 else []
    rc, lines = _main(capsys, "merge", *ckpts, *single, "-o", tmp_path / "out")
    _assert_refused(rc, lines, planted, "builtins.eval", sentinel)
    assert tree_digest(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["save"]


# ----------------------------------------------------------------------------- --trust-pickles


def _exotic_args(ckpts):
    """A harmless class the allowlist does not know, in args (a run's own extension)."""
    return _rewrite_common(ckpts, lambda s: setattr(s["args"], "timeout", datetime.timedelta(minutes=10)))


def test_trust_pickles_lifts_the_refusal_for_an_exotic_class(gpt_tp2, tmp_path, capsys):
    ckpts = ckpt_factory.copy_run(gpt_tp2, tmp_path / "save")
    planted = _exotic_args(ckpts)
    rc, lines = _main(capsys, "merge", *ckpts, "-o", tmp_path / "out")
    assert rc == 2 and "datetime.timedelta" in lines[0] and "--trust-pickles" in lines[0], lines
    assert not (tmp_path / "out").exists()
    rc, lines = _main(capsys, "merge", "--trust-pickles", *ckpts, "-o", tmp_path / "out")
    assert rc == 0, lines
    assert (tmp_path / "out" / dcp.COMMON_FILE).read_bytes() == planted.read_bytes()


def test_trust_reaches_the_watch_merge_child(gpt_tp2, tmp_path):
    ckpts = ckpt_factory.copy_run(gpt_tp2, tmp_path / "save")
    _exotic_args(ckpts)
    save = ckpts[-1].parent
    r = cli("watch", "--save-dir", save, "--num-models", 3, "--once")
    assert r.returncode == 2 and "datetime.timedelta" in r.stderr.strip().splitlines()[-1], r.stderr
    r = cli("watch", "--trust-pickles", "--save-dir", save, "--num-models", 3, "--once")
    assert r.returncode == 0 and (save / "pma" / "iter_0000030").is_dir(), r.stderr


def test_trusting_is_the_python_api_switch(gpt_tp2, tmp_path):
    from megatron_pma.merge import merge_checkpoints
    from megatron_pma.errors import PMAError

    ckpts = ckpt_factory.copy_run(gpt_tp2, tmp_path / "save")
    _exotic_args(ckpts)
    with pytest.raises(PMAError, match="datetime.timedelta"):
        merge_checkpoints(ckpts, tmp_path / "out", progress=False)
    with safe_pickle.trusting():
        merge_checkpoints(ckpts, tmp_path / "out", progress=False)
    assert not safe_pickle.trusted()


# ----------------------------------------------------------------------------- real checkpoints pass


def test_a_bridge_train_state_is_checked_and_copied(gpt_tp2, tmp_path, capsys):
    ckpts = ckpt_factory.copy_run(gpt_tp2, tmp_path / "save")
    for c in ckpts:  # every checkpoint of a Bridge run has one (one alone would be a mixed set)
        torch.save(_train_state(), c / "train_state.pt")
    rc, lines = _main(capsys, "merge", *ckpts, "-o", tmp_path / "out")
    assert rc == 0, lines
    assert (tmp_path / "out" / "train_state.pt").read_bytes() == (ckpts[-1] / "train_state.pt").read_bytes()


def test_a_te_style_extra_state_passes(gpt_tp2, tmp_path, capsys):
    """What TE >= 2.0 pickles in _extra_state (CPU tensors by plain pickle: their storages are
    ``torch.storage._load_from_bytes`` of a torch.save; TE itself needs CUDA, so its recipe
    dataclass is left out) is read through the allowlist and merges."""
    ckpts = ckpt_factory.copy_run(gpt_tp2, tmp_path / "save")
    state = {"forward": {"scale_fwd": torch.ones(3), "amax_history_fwd": torch.zeros(4, 3),
                         "extra_fp8_variables": {"num_gemms": 1}}}
    _plant_byte_object(ckpts, _te_tensor(state))
    rc, lines = _main(capsys, "merge", *ckpts, "-o", tmp_path / "out")
    assert rc == 0, lines


REAL = ["gpt_tp2", "gpt_tp2_pp2", "gpt_tp1_optim", "gpt_tp2_distopt", "gpt_bf16", "gpt_mcore014",
        "gpt_mcore0192", "legacy_bf16", "legacy_distopt"]


@pytest.mark.parametrize("fixture", REAL)
def test_every_real_pickle_passes_the_allowlist(fixture, request):
    """Every pickle of a real save (metadata, common state, byte objects, tensor blobs, legacy
    files) loads through the safe unpickler without --trust-pickles, and the readers accept it."""
    save = request.getfixturevalue(fixture)[0].parent
    count = 0
    for label, data in pickle_globals.pickles(save):
        safe_pickle.load_inert(data, label)
        count += 1
    assert count >= 6  # legacy: one model file (and one distrib_optim.pt) per rank and iteration
    for ckpt in sorted(save.glob("iter_*")):
        if (ckpt / dcp.METADATA_FILE).exists():
            dcp.check_pickles(ckpt, dcp.read_metadata(ckpt))
        for f in ckpt.glob("mp_rank_*/*.pt"):
            torch_pickle.load(f)


def test_a_plain_torch_dcp_save_passes(tmp_path):
    """torch's own DCP save given a Path keeps it in StorageMeta.checkpoint_id (a PosixPath)."""
    import torch.distributed.checkpoint as torch_dcp

    torch_dcp.save({"w": torch.ones(4), "extra": {"seed": 1}}, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    md = dcp.read_metadata(tmp_path / "ckpt")
    dcp.check_pickles(tmp_path / "ckpt", md)
    assert ("pathlib", "PosixPath") in pickle_globals.globals_of((tmp_path / "ckpt" / dcp.METADATA_FILE).read_bytes())


def test_nemo2_pickles_pass_the_allowlist(ckpt_cache_root):
    import nemo2_factory

    labels = []
    for label, data in pickle_globals.pickles(nemo2_factory.cached_nemo_run("nemo2-tp2")):
        safe_pickle.load_inert(data, label)
        labels.append(label)
    assert sum("common.pt" in label for label in labels) >= 3 and any(".metadata" in label for label in labels)


# ----------------------------------------------------------------------------- storage paths


def _point_entry(ckpt: Path, rel: str):
    md = dcp_types.loads((ckpt / dcp.METADATA_FILE).read_bytes())
    info = next(iter(md.storage_data.values()))
    info.relative_path = rel
    (ckpt / dcp.METADATA_FILE).write_bytes(dcp_types.dumps(md))


def _outside_parent(ckpts):
    return "../" + ckpts[0].name + "/" + sorted(ckpts[0].glob("*.distcp"))[0].name


def _outside_absolute(ckpts):
    return str(sorted(ckpts[0].glob("*.distcp"))[0].resolve())


def _outside_symlink(ckpts):
    link = ckpts[-1] / "__9_0.distcp"
    link.symlink_to(sorted(ckpts[0].glob("*.distcp"))[0].resolve())
    return link.name


@pytest.mark.parametrize("where", [_outside_parent, _outside_absolute, _outside_symlink],
                         ids=["dotdot", "absolute", "symlink"])
def test_storage_paths_outside_the_checkpoint_are_refused(where, gpt_tp2, tmp_path, capsys):
    ckpts = ckpt_factory.copy_run(gpt_tp2, tmp_path / "save")
    rel = where(ckpts)
    _point_entry(ckpts[-1], rel)
    rc, lines = _main(capsys, "merge", *ckpts, "-o", tmp_path / "out")
    assert rc == 2 and len(lines) == 1, lines
    assert ".metadata" in lines[0] and "outside the checkpoint folder" in lines[0] and repr(rel) in lines[0], lines
    assert not (tmp_path / "out").exists()
