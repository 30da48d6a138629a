"""Megatron-Bridge save dirs: merged offline (``merge --save-dir``) and by the watcher.

The checkpoints are real megatron-core torch_dist saves of a GPTModel (tests/fixtures, TP=2);
Bridge's file set around them (train_state.pt, both trackers, run_config.yaml, tokenizer/, an
hf/ export) is written with Megatron-Bridge 0.6.2's own TrainState and checkpoint_utils, loaded
from the real wheel, which also reads the results back (see bridge_factory.py for what cannot run
here). Bridge's own ``load_checkpoint`` needs its CUDA training stack: the merged weights are
loaded back with megatron-core's ``dist_checkpointing.load`` into a GPTModel instead.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

import bridge_factory
import ckpt_factory
from helpers import assert_tensors_close, cli, reference_merge, tree_digest
from megatron_pma import layouts, schedules
from megatron_pma.commands.inspect import describe_checkpoint
from megatron_pma.layouts import bridge as bridge_layout
from megatron_pma.merge import optimizer_role

SAMPLES = {10: 100, 20: 150, 30: 400}  # consumed_train_samples: a batch-size ramp-up


@pytest.fixture
def save(gpt_tp2, bridge, tmp_path) -> list[Path]:
    return bridge_factory.make_save_dir(gpt_tp2, tmp_path / "save", SAMPLES)


def _latest_step(bridge, save_dir: Path) -> int:
    cu = bridge.checkpoint_utils
    cu.read_train_state.cache_clear()
    return cu.read_train_state(cu.get_checkpoint_train_state_filename(str(save_dir), prefix=cu.TRACKER_PREFIX)).step


def test_the_save_dir_is_bridges_and_ours_reads_it(save, bridge):
    cu = bridge.checkpoint_utils
    root = save[0].parent
    assert cu.checkpoint_exists(str(root)) and cu.is_checkpoint_iteration_directory(str(save[-1]))
    assert cu.is_hf_checkpoint_dir(str(save[-1] / "hf")) and _latest_step(bridge, root) == 30
    assert cu.read_run_config(cu.get_checkpoint_run_config_filename(str(save[-1])))["train"]["global_batch_size"] == 8
    assert layouts.of_save_dir(root) is bridge_layout.LAYOUT
    assert all(layouts.of_checkpoint(c) is bridge_layout.LAYOUT for c in save)
    assert bridge_layout.LAYOUT.read_tracker(root) == 30
    assert [it for it, _ in layouts.list_checkpoints(root)] == [10, 20, 30]
    # tokens: consumed_train_samples (train_state.pt) x seq_length (run_config.yaml)
    assert [bridge_layout.LAYOUT.tokens(c, it, None) for c, it in zip(save, (10, 20, 30))] == \
        [SAMPLES[it] * bridge_factory.SEQ_LENGTH for it in (10, 20, 30)]
    # ... and `inspect` shows them (Bridge's common state has no Megatron-LM args to read them from)
    assert [describe_checkpoint(c)["tokens"] for c in save] == [SAMPLES[it] * bridge_factory.SEQ_LENGTH
                                                               for it in (10, 20, 30)]


@pytest.mark.slow  # loads the merge into a GPTModel under torchrun (~10-30 s)
def test_merge_save_dir_is_a_bridge_checkpoint_without_hf(save, bridge, tmp_path):
    root = save[0].parent
    before = tree_digest(root)
    out = root / "pma" / "iter_0000030"
    out.parent.mkdir()
    r = cli("merge", "--save-dir", root, "--num-models", "3", "--method", "wma", "--output", out, "--quiet")
    assert r.returncode == 0, r.stderr
    after = tree_digest(root)
    assert {k: after.get(k) for k in before} == before  # inputs and trackers untouched
    names = sorted(p.name for p in out.iterdir())
    assert "hf" not in names and {"run_config.yaml", "train_state.pt", "tokenizer", "metadata.json"} <= set(names)
    for name in ("run_config.yaml", "train_state.pt", "tokenizer"):  # the newest input's, as they were
        assert tree_digest(out / name) == tree_digest(save[-1] / name), name
    prov = json.loads((out / "pma_provenance.json").read_text())
    assert "hf" in prov["left_out"] and "unmerged" in prov["left_out"]["hf"]
    # Bridge's own readers find the merge through both trackers
    cu = bridge.checkpoint_utils
    assert _latest_step(bridge, out.parent) == 30
    assert (out.parent / "latest_checkpointed_iteration.txt").read_text() == "30"
    assert cu.get_checkpoint_name(str(out.parent), 30) == str(out) and cu.checkpoint_exists(str(out.parent))
    ref = reference_merge([ckpt_factory.load_full_tensors(p) for p in save], schedules.wma(3))
    model_ref = {k: v for k, v in ref.items() if optimizer_role(k) is None}
    assert_tensors_close(ckpt_factory.load_full_tensors(out), model_ref)
    _loss, loaded = ckpt_factory.eval_state_dict(out, tp=2)  # megatron-core into a GPTModel
    assert loaded and set(loaded) <= set(model_ref)
    assert_tensors_close(loaded, {k: model_ref[k] for k in loaded})


def test_interval_tokens_come_from_the_train_state_and_run_config(save, tmp_path):
    # tokens 3200, 4800, 12800: 9000 back from iteration 30 is iteration 10 (not 20, and with
    # iteration x global_batch_size no two checkpoints are 9000 tokens apart at all)
    out = tmp_path / "merged"
    r = cli("merge", "--save-dir", save[0].parent, "--num-models", "2", "--interval-tokens", "9000",
            "--output", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "iteration:weight 10:0.5, 30:0.5" in r.stdout, r.stdout


def _hf_tensors(folder: Path) -> dict:
    """Every tensor of a Hugging Face folder, read with the safetensors library itself."""
    from safetensors import safe_open

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_merge_hf_export_merges_every_inputs_hf(save, tmp_path):
    """--merge-hf-export: the output's hf/ is the merge of the inputs' hf/ exports with the main
    merge's weights (equal, up to bf16 rounding, to exporting the merged checkpoint), written over
    the ranks like the main merge; transformers loads it; everything else is as without the flag."""
    root, weights = save[0].parent, schedules.wma(3)
    outs = {name: root / "pma" / name / "iter_0000030" for name in ("hf", "plain", "hf1")}
    for name, flags in (("hf", ["--merge-hf-export", "--workers", "2"]), ("plain", ["--workers", "2"]),
                        ("hf1", ["--merge-hf-export", "--workers", "1"])):
        outs[name].parent.mkdir(parents=True)
        r = cli("merge", "--save-dir", root, "--num-models", "3", "--method", "wma", "--output", outs[name],
                "--quiet", *flags)
        assert r.returncode == 0, r.stderr
    out = outs["hf"]
    got = _hf_tensors(out / "hf")
    assert_tensors_close(got, reference_merge([_hf_tensors(c / "hf") for c in save], weights))
    # the export of the merge: exporting is linear, so the two differ by bf16 roundings only
    # (each input's export and the merged one: at most 2^-8 of the magnitudes each, x2 margin)
    exported = bridge_factory.hf_export(ckpt_factory.load_full_tensors(out))
    inputs = [bridge_factory.hf_export(ckpt_factory.load_full_tensors(c)) for c in save]
    for key, value in got.items():
        scale = sum(w * e[key].abs() for w, e in zip(weights, inputs)) + value.float().abs()
        assert ((value.float() - exported[key]).abs() <= 2 ** -7 * scale + 1e-6).all(), key
    # the newest input's index, config, tokenizer and generation files, as they were
    hf_files = sorted(p.name for p in (save[-1] / "hf").iterdir())
    assert sorted(p.name for p in (out / "hf").iterdir()) == hf_files
    for name in hf_files:
        if not name.endswith(".safetensors"):
            assert (out / "hf" / name).read_bytes() == (save[-1] / "hf" / name).read_bytes(), name
    # 2 processes or 1 write the same bytes; without the flag, the same checkpoint but hf/
    assert tree_digest(out / "hf") == tree_digest(outs["hf1"] / "hf")
    with_hf, plain = tree_digest(out), tree_digest(outs["plain"])
    assert {k: v for k, v in with_hf.items() if not k.startswith("hf/") and k != "pma_provenance.json"} \
        == {k: v for k, v in plain.items() if k != "pma_provenance.json"}
    prov, plain_prov = (json.loads((o / "pma_provenance.json").read_text()) for o in (out, outs["plain"]))
    assert prov["hf"].startswith("merged (hf/ of every input") and "left_out" not in prov
    assert [i["weight"] for i in prov["inputs"]] == weights and "hf" not in plain_prov
    assert "hf" in plain_prov["left_out"]
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(out / "hf")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in got.items()) and set(loaded) == set(got)


def _bad_trackers_disagree(save, tmp):
    (save[0].parent / "latest_checkpointed_iteration.txt").write_text("20")
    return ["--save-dir", save[0].parent, "--num-models", "2"], "trackers disagree"


def _bad_fsdp_dtensor(save, tmp):
    (save[1] / "metadata.json").unlink()  # what Megatron-FSDP's fsdp_dtensor format leaves
    return list(save), "an fsdp_dtensor checkpoint"


def _bad_fsdp_dtensor_in_save_dir(save, tmp):
    (save[2] / "metadata.json").unlink()
    return ["--save-dir", save[0].parent, "--num-models", "2"], "an fsdp_dtensor checkpoint"


def _bad_mixed_with_megatron_lm(save, tmp):
    plain = tmp / "megatron" / "iter_0000040"  # the same torch_dist files, Megatron-LM's file set
    shutil.copytree(save[2], plain, ignore=shutil.ignore_patterns("run_config.yaml", "train_state.pt"))
    return [save[0], save[1], plain], "a Megatron-Bridge checkpoint, but"


def _bad_interval_tokens_without_run_config(save, tmp):
    (save[0] / "run_config.yaml").unlink()
    return ["--save-dir", save[0].parent, "--num-models", "2", "--interval-tokens", "100"], "no run_config.yaml"


def _bad_merge_hf_export_without_an_input_hf(save, tmp):
    shutil.rmtree(save[1] / "hf")  # saved without checkpoint.also_save_hf_checkpoint
    return ["--save-dir", save[0].parent, "--num-models", "3", "--merge-hf-export"], \
        f"{save[1] / 'hf'}: no Hugging Face export here"


def _bad_merge_hf_export_of_different_tensors(save, tmp):
    from safetensors.torch import load_file, save_file

    shard = save[0] / "hf" / bridge_factory.HF_SHARDS[0]
    tensors = load_file(shard)
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:-1].clone()  # another vocab size
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return ["--save-dir", save[0].parent, "--num-models", "3", "--merge-hf-export"], \
        "key transformer.wte.weight has shape [255, 64]"


def _bad_merge_hf_export_nan_found_while_writing(save, tmp):
    """Found by the ranks writing hf/, after the main merge's tensors: the staging folder goes."""
    from safetensors.torch import load_file, save_file

    shard = save[0] / "hf" / bridge_factory.HF_SHARDS[1]
    tensors = load_file(shard)
    tensors["transformer.h.3.mlp.c_fc.weight"][3, 5] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return ["--save-dir", save[0].parent, "--num-models", "3", "--merge-hf-export"], \
        f"{shard}: key transformer.h.3.mlp.c_fc.weight holds NaN/Inf"


def _bad_merge_hf_export_of_megatron_lm(save, tmp):
    plain = [tmp / "megatron" / c.name for c in save[1:]]  # Megatron-LM's file set: no hf/ export
    for src, dst in zip(save[1:], plain):
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("run_config.yaml", "train_state.pt", "hf"))
    return [*plain, "--merge-hf-export"], "a Megatron-LM checkpoint has no Hugging Face export"


BAD = {f.__name__[5:]: f for f in (_bad_trackers_disagree, _bad_fsdp_dtensor, _bad_fsdp_dtensor_in_save_dir,
                                   _bad_mixed_with_megatron_lm, _bad_interval_tokens_without_run_config,
                                   _bad_merge_hf_export_without_an_input_hf,
                                   _bad_merge_hf_export_of_different_tensors,
                                   _bad_merge_hf_export_nan_found_while_writing,
                                   _bad_merge_hf_export_of_megatron_lm)}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_bridge_input(case, save, tmp_path):
    (save[0].parent / "pma").mkdir()
    args, message = BAD[case](save, tmp_path)
    if "--output" not in args:
        args = [*args, "--output", save[0].parent / "pma" / "iter_0000030"]
    before = tree_digest(save[0].parent)
    r = cli("merge", *args, "--quiet")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert list((save[0].parent / "pma").iterdir()) == []  # no output, no staging folder, no tracker
    assert tree_digest(save[0].parent) == before


def test_watch_writes_both_trackers(save, bridge):
    root = save[0].parent
    r = cli("watch", "--save-dir", root, "--num-models", "3", "--once")
    assert r.returncode == 0 and "merged iteration 30: sma of [10,20,30]" in r.stderr, r.stderr
    out = root / "pma" / "iter_0000030"
    assert not (out / "hf").exists() and (out / "run_config.yaml").is_file()
    assert _latest_step(bridge, root / "pma") == 30
    assert (root / "pma" / "latest_checkpointed_iteration.txt").read_text() == "30"


def test_tracker_without_a_folder_is_skipped_by_watch(gpt_tp2, tmp_path):
    """Megatron-LM main's --freeze-all-layers moves the tracker without saving an iter_* folder."""
    ckpts = ckpt_factory.copy_run(gpt_tp2, tmp_path / "save")
    (ckpts[0].parent / "latest_checkpointed_iteration.txt").write_text("40")
    r = cli("watch", "--save-dir", ckpts[0].parent, "--num-models", "3", "--once")
    assert r.returncode == 0, r.stderr
    assert "no merge" in r.stderr and "names iteration 40, but iter_0000040 is missing" in r.stderr, r.stderr
    assert not (ckpts[0].parent / "pma").exists()


def test_either_tracker_may_be_missing(save):
    root = save[0].parent
    (root / "latest_checkpointed_iteration.txt").write_text("20")
    (root / "latest_train_state.pt").unlink()  # .txt only: Megatron-LM's reading
    assert bridge_layout.LAYOUT.read_tracker(root) == 20
    (root / "latest_checkpointed_iteration.txt").unlink()
    shutil.copy(save[1] / "train_state.pt", root / "latest_train_state.pt")  # Bridge's only
    assert bridge_layout.LAYOUT.read_tracker(root) == 20
    assert [it for it, _ in layouts.list_checkpoints(root)] == [10, 20]  # 30 is newer than the tracker


def test_optimizer_average_merges_the_optimizer_state(gpt_tp1_optim, bridge, tmp_path):
    """--optimizer average on a Bridge save dir with Adam state: fp32 master params and moments
    merged like the weights (what Bridge's load with load_optim=True restores)."""
    save = bridge_factory.make_save_dir(gpt_tp1_optim, tmp_path / "save")
    out = tmp_path / "save" / "pma" / "iter_0000030"
    out.parent.mkdir()
    r = cli("merge", "--save-dir", save[0].parent, "--num-models", "2", "--optimizer", "average",
            "--output", out, "--quiet")
    assert r.returncode == 0, r.stderr
    got = ckpt_factory.load_full_tensors(out)
    assert any(optimizer_role(k) == "moment" for k in got) and any(optimizer_role(k) == "param" for k in got)
    assert_tensors_close(got, reference_merge([ckpt_factory.load_full_tensors(p) for p in save[1:]], [0.5, 0.5]))
    assert _latest_step(bridge, out.parent) == 30


def test_pma_hook_on_a_bridge_save_dir(save, bridge, tmp_path):
    """PMAHook (the engine in its merge child) on a Bridge save dir: Bridge outputs, both trackers."""
    from megatron_pma.training import PMAHook

    root = save[0].parent
    with PMAHook(root, 2, method="ema", alpha=0.5) as hook:
        hook.on_checkpoint_saved(30)
    assert [r.status for r in hook.results] == ["ok"], hook.results
    out = root / "pma" / "iter_0000030"
    assert [Path(p).name for p in hook.results[0].inputs] == ["iter_0000020", "iter_0000030"]
    assert not (out / "hf").exists() and (out / "train_state.pt").read_bytes() == (save[-1] / "train_state.pt").read_bytes()
    assert _latest_step(bridge, root / "pma") == 30


def test_watch_and_the_hook_merge_hf_exports_when_asked(save):
    """`watch --merge-hf-export` and PMAHook(merge_hf_export=True) (which PMACallback drives with
    its keyword arguments) pass the option to the engine in their merge child."""
    from megatron_pma.training import PMAHook

    root = save[0].parent
    r = cli("watch", "--save-dir", root, "--num-models", "3", "--once", "--merge-hf-export")
    assert r.returncode == 0 and "merged iteration 30" in r.stderr, r.stderr
    prov = json.loads((root / "pma" / "iter_0000030" / "pma_provenance.json").read_text())
    assert prov["hf"].startswith("merged") and "left_out" not in prov
    with PMAHook(root, 2, merge_hf_export=True, output_root=root / "pma-hook") as hook:
        hook.on_checkpoint_saved(30)
    assert [r.status for r in hook.results] == ["ok"], hook.results
    assert_tensors_close(_hf_tensors(root / "pma-hook" / "iter_0000030" / "hf"),
                         reference_merge([_hf_tensors(c / "hf") for c in save[1:]], [0.5, 0.5]))
