"""What real checkpoints hold beside the weights (issue 17), on real megatron-core saves, each
checked on what megatron-core / Megatron-LM load back:

- Transformer Engine's ``*._extra_state`` (a float ShardedTensor, or a byte object) is never
  averaged: the newest input's (tests/fixtures/extra_state_ckpt.py saves it through
  ``dist_checkpointing.save``);
- an output named ``iter_M`` says M inside: ``common.pt`` (megatron-core 0.16.1), the DCP
  ``common_state`` object (0.19.2), every legacy rank file, Bridge's ``train_state.pt``;
- ``--save-dtype`` for model weights (optimizer state keeps its dtype);
- ``--order given`` for inputs without a readable iteration, and the weights warning;
- ``--allow-extrapolation``.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckpt_factory
import legacy_factory
from helpers import REPO, assert_tensors_close, cli, reference_merge, tree_digest
from megatron_pma import merge_checkpoints, schedules
from megatron_pma.checkpoint import legacy, torch_pickle
from megatron_pma.errors import PMAError
from megatron_pma.formats import legacy_torch
from megatron_pma.merge import optimizer_role

SAVER = REPO / "tests" / "fixtures" / "extra_state_ckpt.py"
RANKS = ("mp_rank_00", "mp_rank_01")


def _mcore(jobs: list[dict], megatron_path=None) -> None:
    """Jobs of the fixture script, in one launch, under megatron-core (0.16.1 of the venv, or
    ``megatron_path``'s)."""
    env = ckpt_factory._env(megatron_path)
    jobs = [{k: str(v) if isinstance(v, Path) else v for k, v in job.items()} for job in jobs]
    r = subprocess.run([sys.executable, str(SAVER), json.dumps(jobs)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


def _load(paths_dtypes: list[tuple[Path, str]], tmp: Path) -> list[dict]:
    """megatron-core's dist_checkpointing.load of each checkpoint (tensors of the given dtype)."""
    outs = [tmp / f"loaded{i}.pt" for i in range(len(paths_dtypes))]
    _mcore([{"op": "load", "dir": p, "dtype": d, "out": o} for (p, d), o in zip(paths_dtypes, outs)])
    return [torch.load(o, weights_only=False) for o in outs]


def _common(paths: list[Path], tmp: Path, megatron_path=None) -> list[dict]:
    """megatron-core's load_common_state_dict of each checkpoint: its iteration fields."""
    outs = [tmp / f"common{i}.json" for i in range(len(paths))]
    _mcore([{"op": "common", "dir": p, "out": o} for p, o in zip(paths, outs)], megatron_path)
    return [json.loads(o.read_text()) for o in outs]


def _merge(*args):
    r = cli("merge", *args, "--quiet")
    assert r.returncode == 0, r.stderr
    return r


def _refused(*args, message: str, watch: Path):
    before = tree_digest(watch)
    r = cli("merge", *args, "--quiet")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert tree_digest(watch) == before  # nothing written, inputs untouched


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[Path]]:
    """Saved in one launch: ``extra`` (every element 111 at iteration 10, 999 at 20: weights and
    extra state, fp32) and ``fp16`` (weights 4096 at iteration 10, 1 at 20, in fp16)."""
    root = tmp_path_factory.mktemp("extra")
    spec = {"extra": ("fp32", 111, 999), "fp16": ("fp16", 4096, 1)}
    jobs, result = [], {}
    for name, (dtype, old, new) in spec.items():
        (root / name).mkdir()
        result[name] = [root / name / "iter_0000010", root / name / "iter_0000020"]
        jobs += [{"op": "save", "dir": d, "iteration": it, "value": v, "dtype": dtype}
                 for d, it, v in zip(result[name], (10, 20), (old, new))]
    _mcore(jobs)
    return result


# ------------------------------------------------------------------------------- extra state


def test_float_extra_state_comes_from_the_newest_input(runs, tmp_path):
    """0.25 x 111 + 0.75 x 999 = 777 for the weight; the float ``_extra_state`` ShardedTensor
    and the byte-object one stay the newest's (999), as megatron-core's load gives them back."""
    out = tmp_path / "merged"
    _merge(*runs["extra"], "--output", out, "--method", "custom", "--weights", "0.25,0.75")
    (got,) = _load([(out, "fp32")], tmp_path)
    assert torch.equal(got["weight"], torch.full((4, 8), 777.0))
    assert torch.equal(got["fc1_extra"], torch.full((3,), 999.0))
    assert got["fc2_extra"] == b"amax 999.0"
    assert got["iteration"] == got["args_iteration"] == 20


def test_legacy_extra_state_tensor_is_not_averaged():
    """The legacy walk gives a model ``_extra_state`` tensor its own role, never averaged."""
    path = ("model", "decoder.layers.0.mlp.linear_fc1._extra_state")
    assert legacy_torch.tensor_role(path) == "extra"
    assert not legacy_torch._averaged("extra", "average", torch.float32)  # noqa: SLF001 (the rule itself)


# ------------------------------------------------------------------------------- save dtype


def test_save_dtype_fp32_keeps_what_fp16_cannot(runs, tmp_path):
    """fp16 inputs 4096 and 1: the fp16 mean is 2048.0 (2048.5 is not an fp16), fp32 gives 2048.5;
    megatron-core loads the fp32 output into fp32 tensors, extra state untouched (float32 already)."""
    _merge(*runs["fp16"], "--output", tmp_path / "as_input")
    _merge(*runs["fp16"], "--output", tmp_path / "fp32", "--save-dtype", "fp32")
    as_input, got = _load([(tmp_path / "as_input", "fp16"), (tmp_path / "fp32", "fp32")], tmp_path)
    assert torch.equal(as_input["weight"], torch.full((4, 8), 2048.0, dtype=torch.float16))
    assert got["weight"].dtype == torch.float32 and torch.equal(got["weight"], torch.full((4, 8), 2048.5))
    md = ckpt_factory.read_metadata(tmp_path / "fp32")
    assert md.state_dict_metadata["decoder.linear_fc1.weight"].properties.dtype == torch.float32
    assert torch.equal(got["fc1_extra"], torch.full((3,), 1.0))


@pytest.mark.slow
def test_save_dtype_fp32_of_a_bf16_run_with_optimizer(gpt_bf16, tmp_path):
    """gpt_bf16 (bf16 weights, fp32 master params, Adam moments) merged to fp32 weights: model keys
    are the float64 reference in fp32, optimizer state keeps its dtype; megatron-core's load into a
    fresh fp32 GPTModel gives exactly those weights."""
    out = tmp_path / "fp32"
    _merge(*gpt_bf16, "--output", out, "--save-dtype", "fp32", "--optimizer", "average")
    ins = [ckpt_factory.load_full_tensors(p) for p in gpt_bf16]
    ref = {k: (sum(w * t[k].double() for w, t in zip(schedules.sma(3), ins)).float()
               if optimizer_role(k) is None else v) for k, v in reference_merge(ins, schedules.sma(3)).items()}
    got = ckpt_factory.load_full_tensors(out)
    for key, value in got.items():
        if optimizer_role(key) is None:
            assert value.dtype == torch.float32, key
        else:
            assert value.dtype == ins[-1][key].dtype, key
    assert_tensors_close(got, ref)
    _, loaded = ckpt_factory.eval_state_dict(out, tp=1, dtype="fp32")
    model = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor) and k in ref}
    assert model and all(torch.equal(v, got[k]) for k, v in model.items())


def test_save_dtype_legacy_files(legacy_bf16, tmp_path):
    """Legacy bf16 model weights written as fp32 (no double rounding: the fp32 mean of the bf16
    inputs); the Float16 optimizer's state keeps its dtype."""
    out = tmp_path / "fp32"
    _merge(*legacy_bf16, "--output", out, "--save-dtype", "fp32", "--optimizer", "average")
    for rank in RANKS:
        files = [p / rank / legacy.MODEL_FILE for p in legacy_bf16]
        obj, _ = torch_pickle.load(out / rank / legacy.MODEL_FILE)
        ins = [torch_pickle.load(f)[0] for f in files]
        for key, t in obj["model"].items():
            if not isinstance(t, torch.Tensor) or not ins[-1]["model"][key].is_floating_point():
                continue
            assert t.dtype == torch.float32, key
            ref = sum(w * i["model"][key].double() for w, i in zip(schedules.sma(3), ins)).float()
            torch.testing.assert_close(t, ref, rtol=1e-6, atol=1e-7, msg=key)
        moments = [t for p, role, ts in legacy_torch.tensors_to_merge([obj], False, "average", [str(out)])
                   if role != "model" for t in ts]
        assert moments and all(t.dtype == torch.float32 for t in moments if t.is_floating_point())


# ------------------------------------------------------------------------------- output iteration


@pytest.mark.slow
def test_output_iteration_in_common_pt(gpt_tp2, tmp_path):
    """megatron-core 0.16.1 (common.pt): an output named iter_0000040 says 40 to megatron-core's
    load_common_state_dict, and the tracker says 40; an explicit --output-iteration too."""
    save = tmp_path / "save"
    save.mkdir()
    _merge(*gpt_tp2, "--output", save / "iter_0000040")
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "40"
    assert json.loads((save / "iter_0000040" / "pma_provenance.json").read_text())["iteration"] == 40
    _merge(*gpt_tp2, "--output", tmp_path / "plain", "--output-iteration", "50")
    named, explicit = _common([save / "iter_0000040", tmp_path / "plain"], tmp_path)
    assert named["iteration"] == 40 and explicit["iteration"] == 50


def test_output_iteration_in_dcp_common_state(gpt_mcore0192, mcore_new_path, tmp_path):
    """megatron-core 0.19.2 keeps the common state inside DCP (common_state/shard_0_1): 0.19.2's
    own load_common_state_dict of the output says 40; the inputs' say 30."""
    out = tmp_path / "save" / "iter_0000040"
    out.parent.mkdir()
    _merge(*gpt_mcore0192, "--output", out)
    assert not (out / "common.pt").exists()
    newest, merged = _common([gpt_mcore0192[-1], out], tmp_path, mcore_new_path)
    assert newest["iteration"] == 30 and merged["iteration"] == 40
    ref = reference_merge([ckpt_factory.load_full_tensors(p) for p in gpt_mcore0192], schedules.sma(3))
    assert_tensors_close(ckpt_factory.load_full_tensors(out), ref)


@pytest.mark.slow
def test_output_iteration_in_legacy_rank_files(legacy_bf16, mcore_new_path, tmp_path):
    """Legacy files: Megatron-LM's load_checkpoint of the save dir resumes at 40 (every rank);
    the merged weights are the same as those of an output that keeps 30."""
    out = tmp_path / "save" / "iter_0000040"
    out.parent.mkdir()
    _merge(*legacy_bf16, "--output", out, "--optimizer", "keep-last-moments")
    for rank in RANKS:
        obj, _ = torch_pickle.load(out / rank / legacy.MODEL_FILE)
        assert obj["iteration"] == 40
    loaded = legacy_factory.load_with_megatron([out.parent], mcore_new_path, optimizer="adam", dtype="bf16")
    for rank, (got,) in zip(RANKS, loaded):
        assert got["iteration"] == 40
        ours, _ = torch_pickle.load(out / rank / legacy.MODEL_FILE)
        for key, value in got["model"].items():
            assert torch.equal(value, ours["model"][key]), key


def test_output_iteration_contradicting_the_name_is_refused(gpt_tp2, tmp_path):
    save = tmp_path / "save"
    save.mkdir()
    _refused(*gpt_tp2, "--output", save / "iter_0000040", "--output-iteration", "50",
             message="named iteration 40 but --output-iteration 50", watch=save)
    assert list(save.iterdir()) == []


def test_bridge_train_state_step_follows_the_output(gpt_tp2, tmp_path):
    """A Bridge output named iter_0000099: its train_state.pt (and so latest_train_state.pt, which
    Bridge's loader reads first) says step 99, as Bridge's own read_train_state sees it."""
    import bridge_factory

    try:
        bridge = bridge_factory.bridge()
    except bridge_factory.WheelUnavailable as e:
        pytest.skip(str(e))
    save = bridge_factory.make_save_dir(gpt_tp2, tmp_path / "save", {10: 100, 20: 150, 30: 400})
    out = save[0].parent / "iter_0000099"
    _merge(*save, "--output", out)
    cu = bridge.checkpoint_utils
    cu.read_train_state.cache_clear()
    state = cu.read_train_state(cu.get_checkpoint_train_state_filename(str(save[0].parent), prefix=cu.TRACKER_PREFIX))
    assert state.step == 99 and state.consumed_train_samples == 400  # only the step is rewritten
    assert (save[0].parent / "latest_checkpointed_iteration.txt").read_text() == "99"


# ------------------------------------------------------------------------------- input order


def _without_iteration(src: Path, dest: Path) -> Path:
    """A copy of a checkpoint whose name and common state say no iteration."""
    shutil.copytree(src, dest)
    state = torch.load(dest / "common.pt", weights_only=False)
    del state["iteration"]
    torch.save(state, dest / "common.pt")
    return dest


def test_order_given_for_inputs_without_an_iteration(gpt_tp2, tmp_path):
    """Refused by default (the message names --order given); with it, the weights follow the
    order typed: 0.25 x (iteration 30's weights) + 0.75 x (iteration 10's)."""
    a = _without_iteration(gpt_tp2[2], tmp_path / "first")
    b = _without_iteration(gpt_tp2[0], tmp_path / "second")
    (tmp_path / "out").mkdir()
    _refused(a, b, "--output", tmp_path / "out" / "m", "--method", "custom", "--weights", "0.25,0.75",
             message="cannot tell its iteration (name it iter_XXXXXXX, or pass --order given", watch=tmp_path)
    r = _merge(a, b, "--output", tmp_path / "out" / "m", "--method", "custom", "--weights", "0.25,0.75",
               "--order", "given")
    assert "?:0.25, ?:0.75" in r.stdout
    ins = [ckpt_factory.load_full_tensors(p) for p in (a, b)]
    assert_tensors_close(ckpt_factory.load_full_tensors(tmp_path / "out" / "m"), reference_merge(ins, [0.25, 0.75]))
    prov = json.loads((tmp_path / "out" / "m" / "pma_provenance.json").read_text())
    assert prov["order"] == "given" and [i["iteration"] for i in prov["inputs"]] == [None, None]


def test_duplicate_iterations_need_order_given(gpt_tp2, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(gpt_tp2[0], a)
    shutil.copytree(gpt_tp2[1], b)
    state = torch.load(b / "common.pt", weights_only=False)
    state["iteration"] = 10  # two saves that both say iteration 10
    torch.save(state, b / "common.pt")
    (tmp_path / "out").mkdir()
    _refused(a, b, "--output", tmp_path / "out" / "m", message="duplicate iteration 10 (also", watch=tmp_path)
    _merge(a, b, "--output", tmp_path / "out" / "m", "--order", "given")
    ins = [ckpt_factory.load_full_tensors(p) for p in (a, b)]
    assert_tensors_close(ckpt_factory.load_full_tensors(tmp_path / "out" / "m"), reference_merge(ins, schedules.sma(2)))


def test_weights_with_inputs_out_of_order_warn_once(gpt_tp2, tmp_path):
    r = _merge(gpt_tp2[2], gpt_tp2[0], gpt_tp2[1], "--output", tmp_path / "m", "--method", "custom",
               "--weights", "0.2,0.3,0.5")
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "sorted by iteration" in warnings[0] and "10:0.2, 20:0.3, 30:0.5" in warnings[0]
    r = _merge(gpt_tp2[2], gpt_tp2[0], gpt_tp2[1], "--output", tmp_path / "g", "--method", "custom",
               "--weights", "0.2,0.3,0.5", "--order", "given")
    assert "order typed (--order given): iteration:weight 30:0.2, 10:0.3, 20:0.5" in r.stderr
    ins = [ckpt_factory.load_full_tensors(p) for p in (gpt_tp2[2], gpt_tp2[0], gpt_tp2[1])]
    assert_tensors_close(ckpt_factory.load_full_tensors(tmp_path / "g"), reference_merge(ins, [0.2, 0.3, 0.5]))
    r = _merge(*gpt_tp2, "--output", tmp_path / "ok", "--method", "custom", "--weights", "0.2,0.3,0.5")
    assert "warning:" not in r.stderr


# ------------------------------------------------------------------------------- extrapolation


def test_extrapolation_refused_by_default_accepted_on_request(gpt_tp2, tmp_path):
    """1.5 x new - 0.5 x old (task arithmetic): refused by default; with --allow-extrapolation the
    exact weighted sum, recorded in the provenance. The Python API takes the same flag."""
    (tmp_path / "out").mkdir()
    _refused(gpt_tp2[0], gpt_tp2[2], "--output", tmp_path / "out" / "m", "--method", "custom",
             "--weights=-0.5,1.5", message="--allow-extrapolation", watch=tmp_path)
    _merge(gpt_tp2[0], gpt_tp2[2], "--output", tmp_path / "out" / "m", "--method", "custom",
           "--weights=-0.5,1.5", "--allow-extrapolation")
    ins = [ckpt_factory.load_full_tensors(p) for p in (gpt_tp2[0], gpt_tp2[2])]
    assert_tensors_close(ckpt_factory.load_full_tensors(tmp_path / "out" / "m"), reference_merge(ins, [-0.5, 1.5]))
    prov = json.loads((tmp_path / "out" / "m" / "pma_provenance.json").read_text())
    assert prov["allow_extrapolation"] is True and [i["weight"] for i in prov["inputs"]] == [-0.5, 1.5]
    with pytest.raises(PMAError, match="sum to 0.9"):
        merge_checkpoints(gpt_tp2[:2], tmp_path / "api", method="custom", weights=[0.5, 0.4], progress=False)
    res = merge_checkpoints(gpt_tp2[:2], tmp_path / "api", method="custom", weights=[0.5, 0.4], progress=False,
                            allow_extrapolation=True)
    assert res.weights == [0.5, 0.4]
    with pytest.raises(PMAError, match="finite"):
        merge_checkpoints(gpt_tp2[:2], tmp_path / "api2", method="custom", weights=[float("inf"), 0.4],
                          progress=False, allow_extrapolation=True)


# ------------------------------------------------------------------------------- hook and watcher


def _dtypes(ckpt: Path) -> set:
    return {v.properties.dtype for k, v in ckpt_factory.read_metadata(ckpt).state_dict_metadata.items()
            if hasattr(v, "properties") and optimizer_role(k) is None}


def test_watch_and_hook_take_save_dtype(gpt_tp2, tmp_path):
    """`watch --save-dtype bf16` and `PMAHook(save_dtype="bf16")` run the real merge child: their
    outputs hold bf16 model weights (the inputs are fp32)."""
    from megatron_pma.training import PMAHook

    save = ckpt_factory.copy_run(gpt_tp2, tmp_path / "save")
    r = cli("watch", "--save-dir", save[0].parent, "--num-models", "2", "--once", "--save-dtype", "bf16")
    assert r.returncode == 0, r.stderr
    assert _dtypes(save[0].parent / "pma" / "iter_0000030") == {torch.bfloat16}
    with PMAHook(save[0].parent, 2, save_dtype="bf16", output_root=tmp_path / "hook", nice=0) as hook:
        hook.on_checkpoint_saved(20)
        assert hook.wait(timeout=300)
    assert [r.status for r in hook.results] == ["ok"], hook.results
    assert _dtypes(tmp_path / "hook" / "iter_0000020") == {torch.bfloat16}


def test_megatron_lm_launcher_takes_save_dtype():
    from megatron_pma.training import megatron_lm

    assert megatron_lm.parse_pma_args(["--pma-num-models", "2", "--pma-save-dtype", "fp32"]).pma_save_dtype == "fp32"
    assert megatron_lm.parse_pma_args(["--pma-num-models", "2"]).pma_save_dtype == "input"
