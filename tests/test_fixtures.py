"""The checkpoint fixtures are what they claim to be (real megatron-core torch_dist saves)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

import ckpt_factory as cf

LAYER_SUBKEYS = [
    "self_attention.linear_qkv.layer_norm_weight",
    "self_attention.linear_qkv.layer_norm_bias",
    "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.bias",
    "self_attention.linear_proj.weight",
    "self_attention.linear_proj.bias",
    "mlp.linear_fc1.layer_norm_weight",
    "mlp.linear_fc1.layer_norm_bias",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc1.bias",
    "mlp.linear_fc2.weight",
    "mlp.linear_fc2.bias",
]
MODEL_KEYS = {
    "embedding.word_embeddings.weight",
    "embedding.position_embeddings.weight",
    "decoder.final_layernorm.weight",
    "decoder.final_layernorm.bias",
    "output_layer.weight",
    *(f"decoder.layers.{k}" for k in LAYER_SUBKEYS),
}
ALL_FIXTURES = ["gpt_tp2", "gpt_tp2_pp2", "gpt_tp1_optim", "gpt_tp2_distopt", "gpt_bf16"]


def _tensor_meta(ckpt):
    md = cf.read_metadata(ckpt)
    return {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


@pytest.mark.parametrize("fixture", ALL_FIXTURES)
def test_layout_tracker_metadata_common(fixture, request):
    dirs = request.getfixturevalue(fixture)
    assert [d.name for d in dirs] == ["iter_0000010", "iter_0000020", "iter_0000030"]
    save = dirs[0].parent
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    for d, it in zip(dirs, (10, 20, 30)):
        meta = json.loads((d / "metadata.json").read_text())
        assert meta["sharded_backend"] == "torch_dist"
        assert (d / ".metadata").is_file() and list(d.glob("__*_*.distcp"))
        common = cf.read_common(d)
        assert common["iteration"] == it
        assert common["checkpoint_version"] == 3.0
        assert common["num_floating_point_operations_so_far"] > 0
        args = common["args"]
        assert isinstance(args, argparse.Namespace)
        assert args.ckpt_format == "torch_dist"
        for field in (
            "global_batch_size", "micro_batch_size", "seq_length", "num_layers", "hidden_size",
            "tensor_model_parallel_size", "pipeline_model_parallel_size",
        ):  # fmt: skip
            assert hasattr(args, field), field
        assert "model" not in common  # model tensors are in DCP, not in common.pt


@pytest.mark.parametrize("fixture", ALL_FIXTURES)
def test_model_keys_and_shapes(fixture, request):
    dirs = request.getfixturevalue(fixture)
    tm = _tensor_meta(dirs[-1])
    model = {k for k in tm if not k.startswith("optimizer.")}
    assert model == MODEL_KEYS
    # stacked layers: leading global layer axis, one chunk per (layer, tp shard)
    qkv = tm["decoder.layers.self_attention.linear_qkv.weight"]
    assert tuple(qkv.size) == (4, 192, 64)
    args = cf.read_common(dirs[-1])["args"]
    assert len(qkv.chunks) == 4 * args.tensor_model_parallel_size
    assert tuple(tm["embedding.word_embeddings.weight"].size) == (256, 64)
    want = torch.bfloat16 if fixture == "gpt_bf16" else torch.float32
    assert all(tm[k].properties.dtype == want for k in model)
    objs = cf.sharded_object_keys(dirs[-1])
    pp, tp = args.pipeline_model_parallel_size, args.tensor_model_parallel_size
    assert sorted(k for k in objs if k.startswith("rng_state/")) == sorted(
        f"rng_state/shard_{p}.{t}_{pp}.{tp}" for p in range(pp) for t in range(tp)
    )
    assert any(k.startswith("decoder.layers.self_attention.linear_qkv._extra_state/") for k in objs)


def test_pipeline_stages_write_their_layers(gpt_tp2_pp2):
    tm = _tensor_meta(gpt_tp2_pp2[-1])
    chunks = tm["decoder.layers.mlp.linear_fc1.weight"].chunks
    assert sorted({c.offsets[0] for c in chunks}) == [0, 1, 2, 3]
    args = cf.read_common(gpt_tp2_pp2[-1])["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)


@pytest.mark.parametrize("fixture", ALL_FIXTURES)
def test_checkpoints_differ(fixture, request):
    dirs = request.getfixturevalue(fixture)
    sds = [cf.load_full_tensors(d) for d in dirs]
    for k in MODEL_KEYS:
        assert not torch.equal(sds[0][k], sds[1][k]), k
        assert not torch.equal(sds[1][k], sds[2][k]), k
    for sd in sds:
        assert all(torch.isfinite(t.float()).all() for t in sd.values())


@pytest.mark.parametrize("fixture", ["gpt_tp1_optim", "gpt_bf16"])
def test_model_shaped_optimizer_state(fixture, request):
    dirs = request.getfixturevalue(fixture)
    sd = cf.load_full_tensors(dirs[-1])
    for k in MODEL_KEYS:
        fp32 = sd[f"optimizer.state.fp32_param.{k}"]
        m, v = sd[f"optimizer.state.exp_avg.{k}"], sd[f"optimizer.state.exp_avg_sq.{k}"]
        assert fp32.dtype == m.dtype == v.dtype == torch.float32
        assert fp32.shape == m.shape == v.shape == sd[k].shape
        # the model weights are the (rounded) fp32 master weights
        assert torch.equal(fp32.to(sd[k].dtype), sd[k]), k
        assert (v >= 0).all() and v.abs().sum() > 0 and m.abs().sum() > 0
    assert {k for k in sd if k.startswith("optimizer.")} == {
        f"optimizer.state.{s}.{k}" for s in ("fp32_param", "exp_avg", "exp_avg_sq") for k in MODEL_KEYS
    }
    opt = cf.read_common(dirs[-1])["optimizer"]
    assert float(opt["optimizer"]["state"]["common_step"]) == 30
    assert len(opt["optimizer"]["param_groups"]) == 2


def test_distributed_optimizer_buckets(gpt_tp2_distopt):
    ckpt = gpt_tp2_distopt[-1]
    tm = _tensor_meta(ckpt)
    prefix = "optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_(torch.float32, torch.float32)"
    bucket_keys = sorted(k for k in tm if k.startswith("optimizer."))
    assert bucket_keys and all(k.startswith(prefix + ".bucket_idx_") for k in bucket_keys)
    n_buckets = len({k.rsplit(".", 1)[0] for k in bucket_keys})
    assert n_buckets >= 2
    assert {k.rsplit(".", 1)[1] for k in bucket_keys} == {"param", "exp_avg", "exp_avg_sq"}
    total = 0
    for k in bucket_keys:
        meta = tm[k]
        assert len(meta.size) == 1
        # chunks tile [0, size) exactly; both DP ranks contribute
        spans = sorted((c.offsets[0], c.offsets[0] + c.sizes[0]) for c in meta.chunks)
        assert spans[0][0] == 0 and spans[-1][1] == meta.size[0]
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        if k.endswith(".param"):
            total += meta.size[0]
    objs = cf.sharded_object_keys(ckpt)
    for name in ("optimizer", "per_bucket_numel", "per_bucket_numel_unpadded"):
        assert f"optimizer.distributed.dp_group_idx_0.{name}/shard_0_1" in objs
    common = cf.read_common(ckpt)
    assert common["optimizer"]["param_state_sharding_type"] == "dp_reshardable"
    assert common["content_metadata"]["distrib_optim_sharding_type"] == "dp_reshardable"
    # The buckets hold exactly the model's parameters (fp32 main params; padding is zero).
    sd = cf.load_full_tensors(ckpt)
    model_numel = sum(sd[k].numel() for k in MODEL_KEYS)
    assert model_numel <= total
    model_sum = sum(sd[k].double().sum().item() for k in MODEL_KEYS)
    model_sq = sum(sd[k].double().square().sum().item() for k in MODEL_KEYS)
    params = [sd[k] for k in bucket_keys if k.endswith(".param")]
    assert math.isclose(sum(p.double().sum().item() for p in params), model_sum, rel_tol=1e-9)
    assert math.isclose(sum(p.double().square().sum().item() for p in params), model_sq, rel_tol=1e-9)
    nonzero = sum(int((p != 0).sum()) for p in params)
    assert nonzero == sum(int((sd[k] != 0).sum()) for k in MODEL_KEYS)
    assert all((sd[k] >= 0).all() for k in bucket_keys if k.endswith(".exp_avg_sq"))


def test_tp2_checkpoint_loads_at_tp1_and_tp2_with_same_loss(gpt_tp2):
    tp1 = cf.eval_losses(gpt_tp2, tp=1)
    tp2 = cf.eval_losses(gpt_tp2, tp=2)
    assert all(math.isfinite(x) for x in tp1)
    for a, b in zip(tp1, tp2):
        assert abs(a - b) < 1e-5
    assert len(set(tp1)) == 3  # the three checkpoints are different models


def test_pp_checkpoint_loads_without_pipeline(gpt_tp2_pp2):
    # saved with TP=2 PP=2, loaded with TP=1 PP=1: DCP reshards; keys are PP-independent
    loss, sd = cf.eval_state_dict(gpt_tp2_pp2[-1], tp=1)
    assert math.isfinite(loss)
    ref = cf.load_full_tensors(gpt_tp2_pp2[-1])
    assert set(sd) == MODEL_KEYS
    for k in MODEL_KEYS:
        assert torch.equal(sd[k], ref[k]), k


# ---------------------------------------------------------------- other megatron-core versions


def test_mcore014_metadata_pickles_megatron_class(gpt_mcore014, gpt_tp2):
    raw = (gpt_mcore014[-1] / ".metadata").read_bytes()
    # a plain DCP Metadata with extra attributes: mcore_data (dict) and all_local_plans, a
    # list of megatron.core.dist_checkpointing.strategies.torch.MCoreSavePlan
    assert b"torch.distributed.checkpoint.metadata" in raw
    assert b"megatron.core.dist_checkpointing.strategies.torch" in raw
    assert b"MCoreSavePlan" in raw and b"mcore_data" in raw
    assert b"megatron.core" not in (gpt_tp2[-1] / ".metadata").read_bytes()
    assert (gpt_mcore014[-1] / "common.pt").exists()
    # same training, same numbers (unpickling works here because megatron is importable)
    a, b = cf.load_full_tensors(gpt_mcore014[-1]), cf.load_full_tensors(gpt_tp2[-1])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_mcore0192_common_state_inside_dcp(gpt_mcore0192, gpt_tp2):
    ckpt = gpt_mcore0192[-1]
    assert not (ckpt / "common.pt").exists()
    meta = json.loads((ckpt / "metadata.json").read_text())
    assert meta["sharded_backend"] == "torch_dist" and "common_backend" not in meta
    assert "common_state/shard_0_1" in cf.sharded_object_keys(ckpt)
    common = cf.read_common_any(ckpt)
    assert common["iteration"] == 30 and common["args"].ckpt_format == "torch_dist"
    a, b = cf.load_full_tensors(ckpt), cf.load_full_tensors(gpt_tp2[-1])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (ckpt.parent / "latest_checkpointed_iteration.txt").read_text() == "30"


def test_failed_rank_is_reported_not_hung(tmp_path):
    with pytest.raises(cf.FixtureBuildError, match="unrecognized arguments"):
        cf.make_run(tmp_path / "save", tp=1, nproc=2, extra_args=["--no-such-flag"])
