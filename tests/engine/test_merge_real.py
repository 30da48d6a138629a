"""The merge on real megatron-core checkpoints (GPTModel, torchrun + gloo), checked against an
independent full-tensor reference computed with plain torch.distributed.checkpoint."""

import json
import os
import threading
from pathlib import Path

import pytest
import torch

import ckpt_factory
from helpers import assert_tensors_close, cli, reference_merge, torchrun_cli
from megatron_pma import merge_checkpoints, schedules
from megatron_pma.checkpoint import writeback
from megatron_pma.formats import torch_dist
from megatron_pma.merge import optimizer_role


def _merge(inputs, out, *extra):
    r = cli("merge", *inputs, "--output", out, "--quiet", *extra)
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.parametrize("method, extra, weights", [
    ("sma", [], schedules.sma(3)),
    ("ema", ["--alpha", "0.3"], schedules.ema(3, 0.3)),
    ("wma", [], schedules.wma(3)),
    ("custom", ["--weights", "0.2,0.3,0.5"], [0.2, 0.3, 0.5]),
])
def test_tp2_merge_equals_reference(gpt_tp2, tmp_path, method, extra, weights):
    out = tmp_path / "merged"
    # inputs given newest-first on purpose: the engine orders them by iteration
    _merge(list(reversed(gpt_tp2)), out, "--method", method, *extra)
    ref = reference_merge([ckpt_factory.load_full_tensors(p) for p in gpt_tp2], weights)
    assert_tensors_close(ckpt_factory.load_full_tensors(out), ref)
    prov = json.loads((out / "pma_provenance.json").read_text())
    assert [i["iteration"] for i in prov["inputs"]] == [10, 20, 30]
    assert [i["weight"] for i in prov["inputs"]] == pytest.approx(weights)
    assert prov["method"] == method
    # common state is the newest input's, byte for byte
    assert (out / "common.pt").read_bytes() == (gpt_tp2[-1] / "common.pt").read_bytes()


@pytest.mark.parametrize("fixture, save_dtype", [("gpt_tp2", "input"), ("gpt_bf16", "input"), ("gpt_tp2", "bf16")])
def test_a_lagging_writer_thread_never_gets_a_reused_slab(fixture, save_dtype, request, tmp_path, monkeypatch):
    """The merge's slabs rotate through three buffers behind the writer thread: with every write
    of that thread delayed (5 ms) and small slabs, the merge keeps it two writes behind all along (a
    ring of two buffers fails here), and the output
    must still be the reference (as the safetensors writer's regression test; the delay only makes
    a broken reuse rule certain to show, the check does not depend on the timing)."""
    run, real_pwrite, lagged = request.getfixturevalue(fixture), os.pwrite, []

    def lagging(fd, data, pos):
        if threading.current_thread().name == "pma-write-behind":
            lagged.append(fd)
            threading.Event().wait(0.005)
        return real_pwrite(fd, data, pos)

    monkeypatch.setattr(writeback.os, "pwrite", lagging)
    monkeypatch.setattr(torch_dist, "SLAB_ELEMENTS", 1024)  # many slabs per tensor: consecutive slab writes
    out = tmp_path / "merged"
    merge_checkpoints(run, out, save_dtype=save_dtype, threads=2, workers=1, progress=False, fsync=False)
    assert len(lagged) > 10, "the merge did not write through the writer thread"
    ins = [{k: v for k, v in ckpt_factory.load_full_tensors(p).items() if optimizer_role(k) is None} for p in run]
    ref = reference_merge(ins, schedules.sma(3))
    if save_dtype == "bf16":
        ref = {k: v.to(torch.bfloat16) if v.is_floating_point() and not k.endswith("_extra_state") else v
               for k, v in ref.items()}
    assert_tensors_close(ckpt_factory.load_full_tensors(out), ref)


@pytest.mark.parametrize("fixture", ["gpt_tp2_pp2", "gpt_bf16"])
def test_pp2_and_bf16_merges_keep_dtype_and_layout(fixture, request, tmp_path):
    run = request.getfixturevalue(fixture)
    out = tmp_path / "merged"
    _merge(run, out, "--method", "ema")
    ins = [{k: v for k, v in ckpt_factory.load_full_tensors(p).items() if optimizer_role(k) is None} for p in run]
    got = ckpt_factory.load_full_tensors(out)
    if fixture == "gpt_bf16":
        assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert_tensors_close(got, reference_merge(ins, schedules.ema(3, 0.2)))
    md_in, md_out = ckpt_factory.read_metadata(run[-1]), ckpt_factory.read_metadata(out)
    for key, entry in md_in.state_dict_metadata.items():
        if hasattr(entry, "chunks") and optimizer_role(key) is None:
            assert sorted(map(str, entry.chunks)) == sorted(map(str, md_out.state_dict_metadata[key].chunks))
    # sharded objects (rng state, extra state) come from the newest input unchanged
    objs = [k for k in ckpt_factory.sharded_object_keys(run[-1]) if optimizer_role(k) is None]
    assert objs and objs == ckpt_factory.sharded_object_keys(out)


def test_optimizer_modes(gpt_tp1_optim, tmp_path):
    ins = [ckpt_factory.load_full_tensors(p) for p in gpt_tp1_optim]
    w = schedules.sma(3)
    roles = {k: optimizer_role(k) for k in ins[-1]}
    assert {"param", "moment"} <= set(roles.values()), roles

    _merge(gpt_tp1_optim, tmp_path / "drop")
    dropped = ckpt_factory.load_full_tensors(tmp_path / "drop")
    assert dropped and all(optimizer_role(k) is None for k in dropped)

    _merge(gpt_tp1_optim, tmp_path / "avg", "--optimizer", "average")
    assert_tensors_close(ckpt_factory.load_full_tensors(tmp_path / "avg"), reference_merge(ins, w))

    _merge(gpt_tp1_optim, tmp_path / "klm", "--optimizer", "keep-last-moments")
    klm = ckpt_factory.load_full_tensors(tmp_path / "klm")
    ref = reference_merge(ins, w)
    for key, role in roles.items():
        if role == "moment":
            assert torch.equal(klm[key], ins[-1][key]), key
        elif klm[key].is_floating_point():
            torch.testing.assert_close(klm[key], ref[key], rtol=1e-6, atol=1e-7)
    # The TRAP: the fp32 master copy must carry the merged weights, or resuming undoes the merge.
    fp32 = {k[len("optimizer.state.fp32_param."):]: v for k, v in klm.items() if k.startswith("optimizer.state.fp32_param.")}
    assert fp32
    for model_key, master in fp32.items():
        torch.testing.assert_close(master, klm[model_key].float(), rtol=1e-6, atol=1e-7)


def test_distributed_optimizer_buckets_averaged(gpt_tp2_distopt, tmp_path):
    ins = [ckpt_factory.load_full_tensors(p) for p in gpt_tp2_distopt]
    assert any(k.startswith("optimizer.distributed.") for k in ins[-1])
    _merge(gpt_tp2_distopt, tmp_path / "avg", "--optimizer", "average", "--method", "wma")
    assert_tensors_close(ckpt_factory.load_full_tensors(tmp_path / "avg"), reference_merge(ins, schedules.wma(3)))


@pytest.mark.parametrize("fixture", ["gpt_mcore014", "gpt_mcore0192"])
def test_other_megatron_versions(fixture, request, tmp_path):
    """0.14 pickles megatron classes into .metadata (read without megatron installed);
    0.19 keeps the common state inside DCP (no common.pt)."""
    run = request.getfixturevalue(fixture)
    _merge(run, tmp_path / "m", "--method", "wma")
    ins = [ckpt_factory.load_full_tensors(p) for p in run]
    assert_tensors_close(ckpt_factory.load_full_tensors(tmp_path / "m"), reference_merge(ins, schedules.wma(3)))
    assert (tmp_path / "m" / "common.pt").exists() == (run[-1] / "common.pt").exists()
    r = cli("inspect", tmp_path / "m", "--json")
    assert r.returncode == 0, r.stderr
    info = __import__("json").loads(r.stdout)
    assert info["iteration"] == 30 and info["tokens"]


def test_merged_checkpoint_loads_into_gptmodel_at_tp1_and_tp2(gpt_tp2, tmp_path):
    """Megatron's own dist_checkpointing.load puts exactly the averaged weights into a fresh
    GPTModel (at TP=1, resharding the TP=2 chunks), and TP=1 / TP=2 give the same loss."""
    out = tmp_path / "merged"
    _merge(gpt_tp2, out)
    ref = reference_merge([ckpt_factory.load_full_tensors(p) for p in gpt_tp2], schedules.sma(3))
    loss_tp1, loaded = ckpt_factory.eval_state_dict(out, tp=1)
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor) and k in ref}
    assert len(tensors) == len([k for k in ref if optimizer_role(k) is None])
    for key, value in tensors.items():
        torch.testing.assert_close(value, ref[key], rtol=1e-6, atol=1e-7, msg=key)
    loss_tp2, loss_last = ckpt_factory.eval_losses([out, gpt_tp2[-1]], tp=2)
    assert loss_tp1 == pytest.approx(loss_tp2, abs=1e-5)
    assert loss_tp1 != pytest.approx(loss_last, abs=1e-6)


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "pma_provenance.json"}


def test_two_processes_write_the_same_bytes_as_one(gpt_tp2, tmp_path):
    _merge(gpt_tp2, tmp_path / "one", "--method", "ema", "--workers", "1")
    r = torchrun_cli(2, "merge", *gpt_tp2, "--output", tmp_path / "two", "--quiet", "--method", "ema")
    assert r.returncode == 0, r.stdout + r.stderr
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) > 3
    for name in one:
        assert one[name] == two[name], name
    assert json.loads((tmp_path / "two" / "pma_provenance.json").read_text())["processes"] == 2
    assert json.loads((tmp_path / "one" / "pma_provenance.json").read_text())["processes"] == 1


def test_forked_workers_write_the_same_bytes_as_one(gpt_tp2, tmp_path):
    _merge(gpt_tp2, tmp_path / "one", "--method", "wma", "--workers", "1")
    assert json.loads((tmp_path / "one" / "pma_provenance.json").read_text())["processes"] == 1
    r = _merge(gpt_tp2, tmp_path / "three", "--method", "wma", "--workers", "3")
    assert r.stdout.count("merged 3 checkpoints") == 1  # only the parent reports
    one, three = _files(tmp_path / "one"), _files(tmp_path / "three")
    assert one.keys() == three.keys() and len(one) > 3
    for name in one:
        assert one[name] == three[name], name
    assert json.loads((tmp_path / "three" / "pma_provenance.json").read_text())["processes"] == 3


def test_save_dir_window_tracker_and_inspect(gpt_tp2, tmp_path):
    save = tmp_path / "save"
    ckpt_factory.copy_run(gpt_tp2, save)
    out = save / "pma" / "iter_0000030"
    out.parent.mkdir()
    r = cli("merge", "--save-dir", save, "--num-models", "2", "--interval-iters", "20",
            "--output", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "10:0.5, 30:0.5" in r.stdout
    assert (save / "pma" / "latest_checkpointed_iteration.txt").read_text() == "30"
    r = cli("inspect", save / "pma", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["tracker"] == 30 and info["checkpoints"][0]["iteration"] == 30
    # the input save dir's tracker is untouched
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "30"


def test_default_workers_one_per_core(gpt_tp2, tmp_path):
    """Without --workers (and without $MEGATRON_PMA_WORKERS) the CLI forks one process per usable
    core, at most 8, and writes the same bytes as one process; under torchrun it stays one per rank."""
    import os

    from megatron_pma.commands.merge import MAX_AUTO_WORKERS

    want = max(1, min(len(os.sched_getaffinity(0)), MAX_AUTO_WORKERS))
    r = cli("merge", *gpt_tp2, "--output", tmp_path / "auto", "--quiet", env={"MEGATRON_PMA_WORKERS": "auto"})
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "auto" / "pma_provenance.json").read_text())["processes"] == want
    _merge(gpt_tp2, tmp_path / "one", "--workers", "1")
    one, auto = _files(tmp_path / "one"), _files(tmp_path / "auto")
    assert one.keys() == auto.keys() and all(one[n] == auto[n] for n in one)
    r = cli("merge", *gpt_tp2, "--output", tmp_path / "bad", "--workers", "0")
    assert r.returncode == 2 and "must be >= 1" in r.stderr and not (tmp_path / "bad").exists()
