"""NeMo 2 checkpoints: merge, inspect, --save-dir window selection and the watch sidecar.

NeMo itself is not installable here (Lightning + fiddle + transformer-engine + CUDA), so the
checkpoints are saved by ``tests/fixtures/save_nemo2_checkpoints.py``: a real megatron-core
GPTModel (TP=2, gloo) trained a few AdamW steps and saved with the very megatron-core call NeMo's
``MegatronCheckpointIO`` makes, ``dist_checkpointing.save(checkpoint, <ckpt>/weights,
FullyParallelSaveStrategyWrapper(...))``, on the dict NeMo's ``MegatronStrategy`` builds (Lightning
fields + ``sharded_state_dict`` under the ``module.`` prefix + the optimizer's sharded state,
``optimizer.state.fp32_param.module.<key>`` ...). The facts it follows, read from NVIDIA/NeMo
(``nemo/lightning/pytorch/callbacks/model_checkpoint.py``, ``nemo/lightning/io/pl.py``,
``nemo/lightning/pytorch/strategies/megatron_strategy.py``, ``nemo/lightning/ckpt_utils.py``,
``nemo/lightning/resume.py``): one dir per checkpoint named
``megatron_gpt--val_loss=X-step=N-consumed_samples=S`` (+ a ``-last`` copy) under
``checkpoints/``, holding ``weights/`` (the dist checkpoint) and ``context/`` (rank 0); a marker
file ``<ckpt>-unfinished`` beside it from the start of a save until it is finalized. The run has
finished steps 10, 20, 30, a ``-last`` copy of 30, and step 40 fully written whose marker stayed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import ckpt_factory
import nemo2_factory
from helpers import assert_tensors_close, cli, reference_merge, tree_digest
from megatron_pma import layouts as discovery  # list_checkpoints / select_window moved to layouts
from megatron_pma.checkpoint import nemo
from megatron_pma.commands.inspect import describe_checkpoint
from megatron_pma.merge import merge_checkpoints, optimizer_role
from megatron_pma.schedules import weights as schedule_weights


@pytest.fixture(scope="module")
def run(ckpt_cache_root) -> Path:
    return nemo2_factory.cached_nemo_run("nemo2-tp2")


def _ckpt(ckpts: Path, step: int, last: bool = False) -> Path:
    [p] = [p for p in ckpts.iterdir() if p.is_dir() and f"-step={step}-" in p.name + "-"
           and p.name.endswith("-last") == last]
    return p


def _weights(ckpts: list[Path]) -> list[dict]:
    return [ckpt_factory.load_full_tensors(c / "weights") for c in ckpts]


@pytest.fixture(scope="module")
def merged(run, tmp_path_factory) -> Path:
    """EMA(0.3) of the window the --save-dir picks, optimizer averaged, via the CLI."""
    out = tmp_path_factory.mktemp("nemo-merge") / "pma-step30"
    r = cli("merge", "--save-dir", run, "--num-models", "3", "--method", "ema", "--alpha", "0.3",
            "--optimizer", "average", "--output", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "iteration:weight 10:" in r.stdout and " 30:" in r.stdout, r.stdout
    return out


def test_discovery_skips_unfinished_and_prefers_non_last(run, tmp_path):
    assert [(s, p.name) for s, p in discovery.list_checkpoints(run)] == \
        [(s, _ckpt(run, s).name) for s in (10, 20, 30)]
    assert nemo.is_unfinished(_ckpt(run, 40))
    copy = tmp_path / "checkpoints"
    shutil.copytree(run, copy)
    shutil.rmtree(_ckpt(copy, 30))  # NeMo's top-k rotation deleted it: the -last copy stands in
    Path(str(_ckpt(copy, 40)) + "-unfinished").unlink()  # the save of step 40 got finalized
    found = discovery.list_checkpoints(copy)
    assert [s for s, _ in found] == [10, 20, 30, 40] and found[2][1] == _ckpt(copy, 30, last=True)
    window = discovery.select_window(copy, 2)
    assert window == [_ckpt(copy, 30, last=True), _ckpt(copy, 40)]


def test_merge_is_a_nemo2_checkpoint_equal_to_float64_reference(run, merged):
    inputs = [_ckpt(run, s) for s in (10, 20, 30)]
    assert sorted(p.name for p in merged.iterdir()) == ["context", "pma_provenance.json", "weights"]
    assert tree_digest(merged / "context") == tree_digest(inputs[-1] / "context")  # the newest's
    assert json.loads((merged / "context" / "io.json").read_text())["fixture_step"] == 30
    assert (merged / "weights" / "common.pt").read_bytes() == (inputs[-1] / "weights" / "common.pt").read_bytes()
    prov = json.loads((merged / "pma_provenance.json").read_text())
    assert [(Path(i["path"]).name, i["iteration"]) for i in prov["inputs"]] == \
        [(p.name, s) for p, s in zip(inputs, (10, 20, 30))]
    out = ckpt_factory.load_full_tensors(merged / "weights")
    assert any(k.startswith("optimizer.state.fp32_param.module.") for k in out)
    assert_tensors_close(out, reference_merge(_weights(inputs), schedule_weights("ema", 3, alpha=0.3)))
    info = describe_checkpoint(merged)
    assert info["format"].startswith("NeMo 2 (weights/: torch_dist") and info["iteration"] == 30


def test_merge_loads_back_into_a_real_gpt_model(run, merged):
    loss, tensors = nemo2_factory.load_with_megatron(merged, tp=1)  # written at TP=2, read at TP=1
    ref = reference_merge(_weights([_ckpt(run, s) for s in (10, 20, 30)]),
                          schedule_weights("ema", 3, alpha=0.3))
    assert tensors and all(k.startswith("module.") for k in tensors)
    assert_tensors_close(tensors, {k: ref[k] for k in tensors})
    assert torch.isfinite(torch.tensor(loss))


def test_nemo_optimizer_keys_keep_the_master_param_trap_handled(run, tmp_path):
    for key, role in [("module.decoder.layers.mlp.linear_fc1.weight", None),
                      ("optimizer.state.fp32_param.module.output_layer.weight", "param"),
                      ("optimizer.state.param.module.output_layer.weight", "param"),  # fully_sharded_model_space
                      ("optimizer.state.exp_avg.module.output_layer.weight", "moment"),
                      ("optimizer.state.exp_avg_sq.module.decoder.final_layernorm.weight", "moment"),
                      ("chained_1.optimizer.state.exp_avg.module.decoder.layers.mlp.experts.weight1", "moment")]:
        assert optimizer_role(key) == role, key
    inputs = [_ckpt(run, s) for s in (20, 30)]
    out = tmp_path / "kept"
    merge_checkpoints(inputs, out, optimizer="keep-last-moments", progress=False, fsync=False)
    got = ckpt_factory.load_full_tensors(out / "weights")
    tensors = _weights(inputs)
    ref = reference_merge(tensors, [0.5, 0.5])
    for key, t in got.items():  # fp32 master params move with the weights; moments are the newest's
        exp = tensors[-1][key] if optimizer_role(key) == "moment" else ref[key]
        torch.testing.assert_close(t, exp, rtol=1e-6, atol=1e-7, msg=key)
    assert sum(optimizer_role(k) == "param" for k in got) == sum(optimizer_role(k) is None for k in got)


def _bad_unfinished(run, tmp):
    return [_ckpt(run, 20), _ckpt(run, 30), _ckpt(run, 40)], "NeMo save not finished"


def _bad_no_weights_metadata(run, tmp):
    (_ckpt(run, 20) / "weights" / "metadata.json").unlink()
    return [_ckpt(run, 10), _ckpt(run, 20)], "weights: no metadata.json"


def _bad_no_weights_dir(run, tmp):
    shutil.rmtree(_ckpt(run, 20) / "weights")
    return [_ckpt(run, 10), _ckpt(run, 20)], "NeMo 2 checkpoint without weights/"


def _bad_mixed_with_megatron_lm(run, tmp):
    plain = tmp / "megatron" / "iter_0000050"  # the same torch_dist files, Megatron-LM layout
    shutil.copytree(_ckpt(run, 30) / "weights", plain)
    return [_ckpt(run, 10), _ckpt(run, 20), plain], "a NeMo 2 checkpoint, but"


def _bad_save_dir_only_unfinished(run, tmp):
    for s in (10, 20, 30):
        shutil.rmtree(_ckpt(run, s))
    shutil.rmtree(_ckpt(run, 30, last=True))
    return ["--save-dir", run, "--num-models", "1"], "no complete checkpoint"


BAD = {f.__name__[5:]: f for f in (_bad_unfinished, _bad_no_weights_metadata, _bad_no_weights_dir,
                                   _bad_mixed_with_megatron_lm, _bad_save_dir_only_unfinished)}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_nemo_input(case, run, tmp_path):
    copy = tmp_path / "checkpoints"
    shutil.copytree(run, copy)
    for p in copy.rglob("*"):
        p.chmod(p.stat().st_mode | 0o200)
    args, message = BAD[case](copy, tmp_path)
    before = tree_digest(copy)
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()
    r = cli("merge", *args, "--output", out, "--quiet")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert list(out.parent.iterdir()) == []  # no output, no staging folder
    assert tree_digest(copy) == before


def test_watch_on_a_nemo_checkpoints_dir(run, tmp_path):
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(run, ckpts)
    r = cli("watch", "--save-dir", ckpts, "--num-models", "3", "--once")
    assert r.returncode == 0, r.stderr
    assert "merged iteration 30: sma of [10,20,30]" in r.stderr, r.stderr
    out = ckpts / "pma" / "iter_0000030"
    assert (out / "weights" / "metadata.json").is_file() and (out / "context" / "io.json").is_file()
    ref = reference_merge(_weights([_ckpt(run, s) for s in (10, 20, 30)]), [1 / 3] * 3)
    model_ref = {k: v for k, v in ref.items() if optimizer_role(k) is None}  # --optimizer drop
    assert_tensors_close(ckpt_factory.load_full_tensors(out / "weights"), model_ref)
    # The outputs folder is not a NeMo checkpoint to our discovery (nor to NeMo's resume globs).
    assert [s for s, _ in discovery.list_checkpoints(ckpts)] == [10, 20, 30]
    Path(str(_ckpt(ckpts, 40)) + "-unfinished").unlink()  # NeMo finalized the save of step 40
    r = cli("watch", "--save-dir", ckpts, "--num-models", "3", "--once")
    assert r.returncode == 0 and "merged iteration 40: sma of [20,30,40]" in r.stderr, r.stderr
    assert (ckpts / "pma" / "latest_checkpointed_iteration.txt").read_text() == "40"
