"""Legacy ``--ckpt-format torch`` checkpoints (``iter_*/mp_rank_XX/model_optim_rng.pt`` and
``distrib_optim.pt``), written by Megatron-LM's own save_checkpoint (megatron-core 0.19.2, see
tests/legacy_factory.py): merged per file, checked against a float64 reference, loaded back with
Megatron-LM's own load_checkpoint, 1 vs 2 processes, optimizer modes and the fp32-master TRAP,
discovery / inspect, and bad input.

Most merges run the CLI in this process (``cli.main``: same exit code and stderr as the
command, without a 2-3 s interpreter start each); torchrun runs it for real for 2 processes.
"""

import json
import math
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

import ckpt_factory
import legacy_factory
from helpers import assert_tensors_close, torchrun_cli, tree_digest
from helpers import cli as cli_subprocess
from megatron_pma import cli, layouts, schedules
from megatron_pma.formats import legacy_torch as legacy_merge
from megatron_pma.checkpoint import discovery, legacy, torch_pickle

RANKS = ("mp_rank_00", "mp_rank_01")
MODEL, DIST = legacy.MODEL_FILE, legacy.DIST_OPTIM_FILE


def run(capsys, *args):
    """The CLI in-process: (exit code, stderr lines, stdout)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.err.strip().splitlines(), out.out


def merge(capsys, inputs, out, *extra):
    rc, err, stdout = run(capsys, "merge", *inputs, "--output", out, "--quiet", *extra)
    assert rc == 0, err
    return stdout


def tensors(file: Path, optimizer="average") -> dict:
    """path -> tensor of every tensor in the model (and optimizer) state of one file."""
    obj, _ = torch_pickle.load(file)
    dist = file.name == DIST
    return {legacy_merge.show(p): ts[-1] for p, _, ts in
            legacy_merge.tensors_to_merge([obj], dist, optimizer, [str(file)])}


def averaged(path: str, t: torch.Tensor, optimizer: str) -> bool:
    """The contract: model weights and fp32 main params always; moments with ``average``."""
    if not t.is_floating_point() or path.endswith(("/step", "/scale")):
        return False
    if path.startswith("model/") or "fp32_from_fp16_params" in path or path.endswith("/param"):
        return True
    return optimizer == "average"


def expected(files: list[Path], weights, optimizer) -> dict:
    """Float64 reference average of the averaged tensors; the newest's tensor for the rest."""
    ins = [tensors(f, optimizer) for f in files]
    out = {}
    for key, t in ins[-1].items():
        if averaged(key, t, optimizer):
            out[key] = sum(w * d[key].double() for w, d in zip(weights, ins)).to(t.dtype)
        else:
            out[key] = t
    return out


def pickle_record(file: Path) -> bytes:
    with zipfile.ZipFile(file) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def bf16_tolerance(ts) -> float:
    """Averaging bf16 weights vs rounding the average of their fp32 masters: a couple of ulps
    at the inputs' largest magnitude."""
    return 2 * 2 ** -8 * max(float(t.float().abs().max()) for t in ts) + 1e-12


# ------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("method, extra, weights, optimizer", [
    ("sma", [], schedules.sma(3), "average"),
    ("ema", ["--alpha", "0.3"], schedules.ema(3, 0.3), "keep-last-moments"),
])
def test_merge_equals_reference(legacy_bf16, tmp_path, capsys, method, extra, weights, optimizer):
    out = tmp_path / "merged"
    merge(capsys, list(reversed(legacy_bf16)), out, "--method", method, *extra, "--optimizer", optimizer)
    for rank in RANKS:
        files = [p / rank / MODEL for p in legacy_bf16]
        ref = expected(files, weights, optimizer)
        got = tensors(out / rank / MODEL, optimizer)
        assert any("fp32_from_fp16_params" in k for k in got)  # the TRAP is in there
        assert_tensors_close(got, ref)
        # Only tensor values changed: Megatron's pickled objects (args, rng, scheduler) are
        # the newest input's, byte for byte.
        assert pickle_record(out / rank / MODEL) == pickle_record(files[-1])
    assert sorted(p.name for p in out.iterdir()) == [*RANKS, "pma_provenance.json"]
    prov = json.loads((out / "pma_provenance.json").read_text())
    assert [i["iteration"] for i in prov["inputs"]] == [10, 20, 30]
    assert [i["weight"] for i in prov["inputs"]] == pytest.approx(weights)
    assert prov["format"].startswith("torch (legacy")


def test_drop_removes_the_optimizer_only(legacy_bf16, tmp_path, capsys):
    out = tmp_path / "merged"
    merge(capsys, legacy_bf16, out)
    for rank in RANKS:
        files = [p / rank / MODEL for p in legacy_bf16]
        got, _ = torch_pickle.load(out / rank / MODEL)
        newest, _ = torch_pickle.load(files[-1])
        assert "optimizer" not in got and set(got) == set(newest) - {"optimizer"}
        assert got["iteration"] == 30 and got["opt_param_scheduler"] == newest["opt_param_scheduler"]
        assert_tensors_close(tensors(out / rank / MODEL, "drop"), expected(files, schedules.sma(3), "drop"))


def test_megatron_loads_the_merges_and_the_fp32_masters_carry_them(legacy_bf16, mcore_new_path,
                                                                   tmp_path, capsys):
    """Megatron-LM's load_checkpoint, with the optimizer (``keep-last-moments``) and with
    ``--no-load-optim`` (``drop``). The TRAP: what a resumed run trains from (the Float16
    optimizer's fp32 main params) must be the merged weights, not the newest input's."""
    avg, drop = tmp_path / "klm" / "iter_0000030", tmp_path / "drop" / "iter_0000030"
    for out, mode in ((avg, "keep-last-moments"), (drop, "drop")):
        out.parent.mkdir()
        merge(capsys, legacy_bf16, out, "--optimizer", mode)
        assert (out.parent / discovery.TRACKER).read_text() == "30"
    loaded = legacy_factory.load_with_megatron(
        [legacy_bf16[-1].parent, avg.parent, f"{drop.parent}:no-optim"], mcore_new_path,
        optimizer="adam", dtype="bf16")
    for rank, (last, from_avg, from_drop) in zip(RANKS, loaded):
        assert last["iteration"] == from_avg["iteration"] == from_drop["iteration"] == 30
        ours = {k[len("model/"):]: v for k, v in tensors(avg / rank / MODEL).items() if k.startswith("model/")}
        for got in (from_avg, from_drop):
            for key, value in got["model"].items():
                assert torch.equal(value, ours[key]), key
        inputs = [tensors(p / rank / MODEL) for p in legacy_bf16]
        assert from_avg["main_params"].keys() == last["main_params"].keys() == ours.keys()
        moved = 0.0
        for key, main in from_avg["main_params"].items():
            tol = bf16_tolerance(d[f"model/{key}"] for d in inputs)
            assert float((main - ours[key].float()).abs().max()) <= tol, key
            moved = max(moved, float((main - last["main_params"][key]).abs().max()))
        assert moved > 0.01  # the newest input's masters would have undone the merge
        assert math.isfinite(last["loss"]) and math.isfinite(from_avg["loss"])
        assert from_avg["loss"] == pytest.approx(from_drop["loss"]) and from_avg["loss"] != last["loss"]


def test_distributed_optimizer_state(legacy_distopt, mcore_new_path, tmp_path, capsys):
    """distrib_optim.pt: fp32 main params averaged whenever kept (the TRAP), moments per mode;
    dropped with ``drop``; Megatron's DistributedOptimizer loads the merge."""
    klm = tmp_path / "klm" / "iter_0000030"
    klm.parent.mkdir()
    merge(capsys, legacy_distopt, klm, "--optimizer", "keep-last-moments", "--method", "wma")
    for rank in RANKS:
        for name in (MODEL, DIST):
            files = [p / rank / name for p in legacy_distopt]
            ref = expected(files, schedules.wma(3), "keep-last-moments")
            got = tensors(klm / rank / name)
            assert_tensors_close(got, ref)
        assert any(k.endswith("/param") for k in tensors(klm / rank / DIST))
    merge(capsys, legacy_distopt, tmp_path / "drop")
    assert not list((tmp_path / "drop").rglob(DIST))
    loaded = legacy_factory.load_with_megatron([klm.parent], mcore_new_path, optimizer="dist", dtype="bf16")
    for rank, (res,) in zip(RANKS, loaded):
        inputs = [tensors(p / rank / MODEL) for p in legacy_distopt]
        for key, main in res["main_params"].items():
            tol = bf16_tolerance(d[f"model/{key}"] for d in inputs)
            assert float((main - res["model"][key].float().reshape(-1)).abs().max()) <= tol, key


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "pma_provenance.json"}


def test_two_processes_write_the_same_bytes_as_one(legacy_distopt, tmp_path, capsys):
    """Each file is written whole by one rank (rank r: files r, r+P, ...), so the bytes do not
    depend on the number of processes."""
    merge(capsys, legacy_distopt, tmp_path / "one", "--method", "ema", "--optimizer", "average", "--workers", "1")
    r = torchrun_cli(2, "merge", *legacy_distopt, "--output", tmp_path / "two", "--quiet",
                     "--method", "ema", "--optimizer", "average")
    assert r.returncode == 0, r.stdout + r.stderr
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len(one) == 4 and one.keys() == two.keys()
    for name in one:
        assert one[name] == two[name], name
    assert json.loads((tmp_path / "two" / "pma_provenance.json").read_text())["processes"] == 2


# ------------------------------------------------------------------- save dirs, watch, inspect


def test_save_dir_discovery_window_and_inspect(legacy_bf16, tmp_path, capsys):
    save = tmp_path / "save"
    ckpts = ckpt_factory.copy_run(legacy_bf16, save)
    assert [it for it, _ in layouts.list_checkpoints(save)] == [10, 20, 30]
    # Megatron writes the tracker after every rank saved: a save beyond it is not final ...
    (save / discovery.TRACKER).write_text("20")
    assert [it for it, _ in layouts.list_checkpoints(save)] == [10, 20]
    (save / discovery.TRACKER).write_text("30")
    # ... nor one whose rank file is still being written (no zip end record yet).
    part = ckpts[1] / "mp_rank_01" / MODEL
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    assert [it for it, _ in layouts.list_checkpoints(save)] == [10, 30]
    part.write_bytes(data)
    # a token window reads seq_length / batch size from the pickled args
    out = save / "pma" / "iter_0000030"
    out.parent.mkdir()
    stdout = merge(capsys, ["--save-dir", save, "--num-models", "2", "--interval-tokens", "2560"], out)
    assert "10:0.5, 30:0.5" in stdout
    assert (save / "pma" / discovery.TRACKER).read_text() == "30"
    rc, err, stdout = run(capsys, "inspect", out)
    assert rc == 0, err
    assert "torch (legacy" in stdout and "iteration 30" in stdout and "mp_rank_01:model/" in stdout
    rc, err, stdout = run(capsys, "inspect", save, "--json")
    assert rc == 0, err
    info = json.loads(stdout)
    assert info["tracker"] == 30 and [c["iteration"] for c in info["checkpoints"]] == [10, 20, 30]
    assert info["checkpoints"][0]["tokens"] == 10 * 4 * 32  # iteration x global batch x seq
    assert info["checkpoints"][0]["optimizer_state"] == ["moment", "param"]


def test_watch_merges_a_legacy_save_dir_once(legacy_bf16, tmp_path):
    save = tmp_path / "save"
    ckpt_factory.copy_run(legacy_bf16, save)
    r = cli_subprocess("watch", "--save-dir", save, "--num-models", "3", "--once")
    assert r.returncode == 0, r.stderr
    out = save / "pma" / "iter_0000030"
    assert sorted(p.name for p in out.iterdir()) == [*RANKS, "pma_provenance.json"]
    assert (save / "pma" / discovery.TRACKER).read_text() == "30"
    before = tree_digest(save)
    r = cli_subprocess("watch", "--save-dir", save, "--num-models", "3", "--once")
    assert r.returncode == 0, r.stderr  # the window is recognised as merged: nothing to do
    assert tree_digest(save) == before


# -------------------------------------------------------------------------------- bad input


def _rewrite(file: Path, change) -> None:
    """Load a rank file, change it, save it back with torch.save (as a damaged save would)."""
    obj, codec = torch_pickle.load(file, mmap=False)
    change(obj)
    codec.save(obj, file)


def _case_rank_dirs_differ(save, tmp):
    shutil.rmtree(save[0] / "mp_rank_01")
    return save, "has no mp_rank_01 (present in"


def _case_rank_file_missing(save, tmp):
    (save[1] / "mp_rank_01" / MODEL).unlink()
    return save, f"mp_rank_01/{MODEL}: missing (incomplete save?)"


def _case_truncated(save, tmp):
    f = save[1] / "mp_rank_00" / MODEL
    os.truncate(f, f.stat().st_size // 2)
    return save, "truncated"


def _case_corrupted_pickle(save, tmp):
    with open(save[2] / "mp_rank_01" / MODEL, "r+b") as f:
        f.seek(300)
        f.write(b"\xff" * 300)
    return save, "unreadable"


def _case_shape_mismatch(save, tmp):
    key = "embedding.word_embeddings.weight"
    _rewrite(save[0] / "mp_rank_01" / MODEL, lambda o: o["model"].__setitem__(key, o["model"][key][:-1].clone()))
    return save, f"key model/{key} has shape [127, 64]"


def _case_nan(save, tmp):
    key = "decoder.layers.1.mlp.linear_fc1.weight"
    _rewrite(save[1] / "mp_rank_00" / MODEL, lambda o: o["model"][key].view(-1)[7].fill_(float("nan")))
    return save, f"key model/{key} holds NaN/Inf"


def _case_other_optimizer(save, tmp, distopt):
    return [save[0], save[1], distopt[2], "--optimizer", "average"], "saved with another optimizer?"


def _case_mixed_formats(save, tmp, gpt_tp2):
    return [save[0], save[1], gpt_tp2[2]], "mixed checkpoint formats"


CASES = {name[len("_case_"):]: fn for name, fn in globals().items() if name.startswith("_case_")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, legacy_bf16, request, tmp_path, capsys):
    save = ckpt_factory.copy_run(legacy_bf16, tmp_path / "save")
    extra = {"other_optimizer": ("legacy_distopt",), "mixed_formats": ("gpt_tp2",)}.get(case, ())
    args, message = CASES[case](save, tmp_path, *map(request.getfixturevalue, extra))
    out = tmp_path / "out" / "iter_0000030"
    out.parent.mkdir()
    before = tree_digest(tmp_path / "save")
    rc, err, _ = run(capsys, "merge", *args, "--output", out, "--quiet")
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert list(out.parent.iterdir()) == []  # no output, no staging folder, no tracker
    assert tree_digest(tmp_path / "save") == before


def test_nonfinite_allowed_on_request(legacy_bf16, tmp_path, capsys):
    save = ckpt_factory.copy_run(legacy_bf16, tmp_path / "save")
    _case_nan(save, tmp_path)
    merge(capsys, save, tmp_path / "m", "--allow-nonfinite")
