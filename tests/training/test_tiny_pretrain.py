"""Real tiny pretraining (megatron-core GPTModel, torch.distributed gloo): Megatron-LM layout,
exact resume, and PMA-init from merged checkpoints (weights only / with averaged optimizer state),
and loss-spike recovery from the merge of the checkpoints saved before the spike."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pma_train_helpers import run_many, summary

MODEL_KEY = "decoder.final_layernorm.weight"


def _common(ckpt: Path) -> dict:
    return torch.load(ckpt / "common.pt", weights_only=False)


def _keys(ckpt: Path) -> set:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)


def test_megatron_layout(tiny_pretrain_run):
    save = tiny_pretrain_run
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000010", "iter_0000020", "iter_0000030"]
    ckpt = save / "iter_0000030"
    assert json.loads((ckpt / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    common = _common(ckpt)
    assert common["iteration"] == 30 and common["checkpoint_version"] >= 3.0
    assert common["num_floating_point_operations_so_far"] > 0
    args = common["args"]
    assert args.__class__.__name__ == "Namespace"
    assert (args.seq_length, args.micro_batch_size, args.global_batch_size, args.tensor_model_parallel_size) == (64, 8, 8, 2)
    assert args.lr == 3e-3 and args.consumed_train_samples == 30 * 8
    keys = _keys(ckpt)
    assert MODEL_KEY in keys and "embedding.word_embeddings.weight" in keys
    model_keys = {k for k in keys if not k.startswith("optimizer.") and "/shard_" not in k}  # tensors
    for k in model_keys:
        for s in ("fp32_param", "exp_avg", "exp_avg_sq"):
            assert f"optimizer.state.{s}.{k}" in keys, (s, k)
    # the hook merged the last 3 checkpoints (with their optimizer state) into <save>/pma
    pma = save / "pma"
    assert (pma / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    assert f"optimizer.state.exp_avg.{MODEL_KEY}" in _keys(pma / "iter_0000030")
    prov = json.loads(next((pma / "iter_0000030").glob("*provenance*.json")).read_text())
    assert "iter_0000010" in json.dumps(prov) and "iter_0000030" in json.dumps(prov)
    s = summary(save)
    assert [r["status"] for r in s["hook_results"]][-1] == "ok"


def test_resume_continues_exactly(tiny_pretrain_run, pma_init_runs):
    """--load at iteration 20 (TP=2 checkpoint into TP=1) replays iterations 21..30 of the run:
    same data position, same optimizer state, same losses."""
    out = pma_init_runs["resumed"]
    s, base = summary(out), summary(tiny_pretrain_run)
    assert s["start_iteration"] == 20 and s["iteration"] == 30 and s["optimizer_loaded"]
    got = dict((i, l) for i, l in s["losses"])
    ref = dict((i, l) for i, l in base["losses"])
    assert sorted(got) == list(range(21, 31))
    for i in got:
        assert got[i] == pytest.approx(ref[i], rel=2e-3, abs=2e-3), i
    assert _common(out / "iter_0000030")["iteration"] == 30


def test_pma_init_finetune_weights_only(pma_init_runs):
    """(a) continual training / SFT from the merge, weights only: iteration restarts at 0."""
    out = pma_init_runs["ct"]
    s = summary(out)
    assert s["loaded_from"].endswith("pma/iter_0000030")
    assert s["start_iteration"] == 0 and s["iteration"] == 20 and not s["optimizer_loaded"]
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "20"
    assert _common(out / "iter_0000020")["iteration"] == 20
    losses = [l for _, l in s["losses"]]
    assert all(math.isfinite(l) for l in losses)
    assert s["val_loss"] < s["initial_val_loss"]


def test_pma_init_resume_with_averaged_optimizer(tiny_pretrain_run, pma_init_runs):
    """(b) resume from a merge carrying averaged optimizer state: iteration continues, the optimizer
    (incl. merged fp32 params) is loaded, training goes on and improves."""
    out = pma_init_runs["resume_merge"]
    s = summary(out)
    assert s["start_iteration"] == 30 and s["iteration"] == 45 and s["optimizer_loaded"]
    assert all(math.isfinite(l) for _, l in s["losses"])
    assert s["val_loss"] < s["initial_val_loss"]
    # the merge's weights were the starting point: held-out loss at start = the merge's loss,
    # not the last checkpoint's
    assert s["initial_val_loss"] != pytest.approx(summary(tiny_pretrain_run)["val_loss"], abs=1e-6)


@pytest.mark.slow
def test_loss_spike_recovery(tiny_pretrain_run, tmp_path):
    """(c) a spike (LR x100 after iteration 30) ruins the run; resuming from the merge of the 3
    checkpoints saved before it (with their averaged optimizer state), at the normal LR, brings the
    run back below the spiked loss."""
    spiked, rec, out = tmp_path / "spiked", tmp_path / "recover", tmp_path / "recovered"
    rec.mkdir()
    run_many([
        ["--load", tiny_pretrain_run, "--save", spiked, "--train-iters", "40", "--save-interval", "10",
         "--lr", "0.3", "--clip-grad", "0"],
        # the checkpoints before the spike: window of 3 ending at or before iteration 30
        {"merge": {"save_dir": str(tiny_pretrain_run), "num_models": 3, "up_to_iteration": 30,
                   "output": str(rec / "iter_0000030"), "optimizer": "average"}},
        ["--load", rec, "--save", out, "--train-iters", "40", "--save-interval", "10"],
    ])
    s_spike = summary(spiked)
    assert s_spike["val_loss"] > summary(tiny_pretrain_run)["val_loss"] + 0.1
    prov = json.dumps(json.loads(next((rec / "iter_0000030").glob("*provenance*.json")).read_text()))
    assert all(f"iter_00000{i}0" in prov for i in (1, 2, 3))
    s = summary(out)
    assert s["start_iteration"] == 30 and s["optimizer_loaded"]
    assert s["val_loss"] < s_spike["val_loss"] - 0.1
