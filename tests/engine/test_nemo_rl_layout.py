"""NeMo-RL v0.7 checkpoint dirs, both policy backends, merged offline and by the watcher.

The step folders are arranged exactly as NeMo-RL v0.7 writes them (source in
../shared/upstream/nemo-rl/v0.7.0/):

- ``nemo_rl/utils/checkpoint.py`` ``CheckpointManager.init_tmp_checkpoint`` (l. 195-235): the
  folder is ``tmp_step_{step}`` holding ``training_info.json`` (json.dump) and ``config.yaml``;
  ``finalize_checkpoint`` (l. 237-266) renames it to ``step_{step}``; ``get_latest_checkpoint_path``
  (l. 355-372) takes the highest ``step_\\d+``; ``get_resume_paths`` (l. 150-193) reads
  ``policy/weights`` and ``policy/optimizer`` (DTensor) or ``policy/weights/iter_0000000/common.pt``
  (Megatron).
- ``nemo_rl/algorithms/grpo.py`` (l. 2933-2970): ``policy.save_checkpoint(weights_path=step/policy/
  weights, optimizer_path=step/policy/optimizer, tokenizer_path=step/policy/tokenizer)`` and
  ``torch.save(dataloader.state_dict(), step/train_dataloader.pt)``.
- Megatron backend, ``nemo_rl/models/policy/workers/megatron_policy_worker.py`` ``save_checkpoint``
  (l. 1666-1745): ``cfg.checkpoint.save = weights_path`` then Megatron-Bridge's ``save_checkpoint``
  with NeMo-RL's never-advanced train state: one Bridge checkpoint ``iter_0000000`` (torch_dist,
  model and optimizer in one DCP) plus Bridge's trackers. Here: real megatron-core torch_dist saves
  (tests/fixtures, with optimizer state) renamed ``iter_0000000``, and Bridge 0.6.2's own
  ``TrainState`` / ``checkpoint_utils`` from the real wheel for the files around it
  (bridge_factory.finalize).
- DTensor backend, ``nemo_rl/models/automodel/checkpoint.py`` ``save_checkpoint`` (l. 246-329):
  NeMo Automodel's checkpointer writes safetensors under ``weights/model`` (``save_model``) and the
  optimizer as a torch DCP under ``policy/optimizer``; ``detect_checkpoint_format`` (l. 393-425)
  reads ``*.safetensors`` as model_save_format "safetensors". The real Automodel checkpointer runs
  here on CPU (tests/engine/test_nemo_rl_automodel.py merges its saves, 1 and 2 ranks); these quick
  steps, for the layout, watch and bad-input tests, are Hugging Face ``save_pretrained`` sharded
  safetensors of a tiny Llama and the optimizer as Automodel's ``save_optimizer`` lays it out.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import automodel_factory
import bridge_factory
import ckpt_factory
from helpers import assert_tensors_close, cli, reference_merge, tree_digest
from megatron_pma import layouts, schedules
from megatron_pma.layouts import nemo_rl
from megatron_pma.merge import optimizer_role

transformers = pytest.importorskip("transformers")
STEPS = (10, 20, 30)


def nemo_rl_step_files(step_dir: Path, step: int, backend: str) -> None:
    """What CheckpointManager.init_tmp_checkpoint and grpo.py write around the policy."""
    step_dir.mkdir(parents=True, exist_ok=True)
    (step_dir / "training_info.json").write_text(json.dumps({"step": step, "total_steps": step,
                                                               "consumed_samples": step * 64}))
    (step_dir / "config.yaml").write_text(yaml.safe_dump({"policy": {"model_name": "tiny", "megatron_cfg": {
        "enabled": backend == "megatron"}, "dtensor_cfg": {"enabled": backend == "dtensor"}}}))
    torch.save({"sampler_iter": step}, step_dir / "train_dataloader.pt")
    tok = step_dir / "policy" / "tokenizer"
    tok.mkdir(parents=True)
    (tok / "tokenizer.json").write_text(json.dumps({"version": f"step-{step}"}))


def make_megatron_steps(run: list[Path], ckpt_dir: Path) -> list[Path]:
    """step_10/20/30 of the Megatron backend from a real torch_dist run (optimizer included)."""
    steps = []
    for step, src in zip(STEPS, run):
        step_dir = ckpt_dir / f"step_{step}"
        nemo_rl_step_files(step_dir, step, "megatron")
        weights = step_dir / "policy" / "weights"
        weights.mkdir()
        shutil.copytree(src, weights / nemo_rl.BRIDGE_ITER)
        for p in [weights, *weights.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
        bridge_factory.finalize(weights, 0, 0)  # NeMo-RL never advances Bridge's step
        steps.append(step_dir)
    return steps


def make_dtensor_steps(ckpt_dir: Path, steps=STEPS) -> list[Path]:
    """Weights by save_pretrained; the optimizer as Automodel's save_optimizer writes it: torch's
    flattened optimizer state dict (get_optimizer_state_dict) under "optim", saved with DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    out = []
    for i, step in enumerate(steps):
        step_dir = ckpt_dir / f"step_{step}"
        nemo_rl_step_files(step_dir, step, "dtensor")
        model = automodel_factory.tiny_llama(i)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(i + 1):  # moments and step counts differ between steps
            ids = torch.randint(0, automodel_factory.VOCAB, (2, 8), generator=torch.Generator().manual_seed(i))
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        model.save_pretrained(step_dir / "policy" / "weights" / "model", max_shard_size="20KB")
        osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
        dcp.save({"optim": osd}, checkpoint_id=str(step_dir / "policy" / "optimizer" / "optim"), no_dist=True)
        out.append(step_dir)
    return out


def _st_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture
def megatron_steps(gpt_tp1_optim, bridge, tmp_path) -> list[Path]:
    return make_megatron_steps(gpt_tp1_optim, tmp_path / "results")


@pytest.fixture
def dtensor_steps(tmp_path) -> list[Path]:
    return make_dtensor_steps(tmp_path / "results")


def test_megatron_backend_steps_are_found_by_step_number(megatron_steps, bridge):
    root = megatron_steps[0].parent
    (root / "tmp_step_40" / "policy").mkdir(parents=True)  # a save in flight: skipped
    (root / "tmp_step_40" / "training_info.json").write_text("{}")
    assert layouts.of_save_dir(root) is nemo_rl.MEGATRON
    assert [it for it, _ in layouts.list_checkpoints(root)] == list(STEPS)
    newest = megatron_steps[-1]
    for p in (newest, newest / "policy", newest / "policy" / "weights", newest / "policy" / "weights" / "iter_0000000"):
        assert layouts.of_checkpoint(p) is nemo_rl.MEGATRON and nemo_rl.MEGATRON.root(p) == newest
        assert nemo_rl.MEGATRON.iteration(p, lambda: None) == 30
    # the Bridge save dir inside is Bridge's own: its reader finds iter_0000000 at step 0
    cu = bridge.checkpoint_utils
    assert cu.checkpoint_exists(str(newest / "policy" / "weights"))


@pytest.mark.parametrize("optimizer", ["drop", "average"])
def test_merge_megatron_backend_save_dir_into_a_step_folder(megatron_steps, optimizer):
    root = megatron_steps[0].parent
    before = tree_digest(root)
    out = root / "pma" / "step_30"
    out.parent.mkdir()
    r = cli("merge", "--save-dir", root, "--num-models", "3", "--method", "wma", "-o", out, "--optimizer",
            optimizer, "-q")
    assert r.returncode == 0, r.stderr
    after = tree_digest(root)
    assert {k: after.get(k) for k in before} == before
    newest = megatron_steps[-1]
    for rel in ("config.yaml", "training_info.json", "train_dataloader.pt", "policy/tokenizer",
                "policy/weights/latest_train_state.pt", "policy/weights/latest_checkpointed_iteration.txt",
                "policy/weights/iter_0000000/run_config.yaml", "policy/weights/iter_0000000/train_state.pt"):
        assert tree_digest(out / rel) == tree_digest(newest / rel), rel
    data = out / "policy" / "weights" / "iter_0000000"
    ref = reference_merge([ckpt_factory.load_full_tensors(s / "policy/weights/iter_0000000") for s in megatron_steps],
                          schedules.wma(3))
    if optimizer == "drop":
        ref = {k: v for k, v in ref.items() if optimizer_role(k) is None}
    else:
        assert any(optimizer_role(k) == "moment" for k in ref)
    assert_tensors_close(ckpt_factory.load_full_tensors(data), ref)
    prov = json.loads((out / "pma_provenance.json").read_text())
    assert [i["iteration"] for i in prov["inputs"]] == list(STEPS) and prov["optimizer"] == optimizer
    # NeMo-RL v0.7's own resume logic (it loads the optimizer iff common.pt has an "optimizer" entry)
    # sees the optimizer state the merge has: none after drop
    resume = _nemo_rl_resume_paths(out)
    assert _nemo_rl_resume_paths(newest) == (newest / "policy/weights", newest / "policy/optimizer")
    assert resume == (out / "policy/weights", None if optimizer == "drop" else out / "policy/optimizer")
    if optimizer == "drop":  # nothing else in the common state changed
        merged, last = (torch.load(p / "policy/weights/iter_0000000/common.pt", weights_only=False)
                        for p in (out, newest))
        assert "optimizer" in last and merged.keys() == last.keys() - {"optimizer"}
        assert merged["iteration"] == last["iteration"] and vars(merged["args"]) == vars(last["args"])


def test_merge_hf_export_of_megatron_backend_steps(megatron_steps):
    """--merge-hf-export where each step's Bridge checkpoint holds an hf/ export. NeMo-RL v0.7 never
    asks Bridge for one (nemo_rl/models/megatron/setup.py builds its CheckpointConfig without
    also_save_hf_checkpoint), a run that sets it gets one per step: written here as in
    bridge_factory (each checkpoint's own weights, re-laid out into GPT-2 names)."""
    bridge_iter = Path("policy") / "weights" / nemo_rl.BRIDGE_ITER
    for step in megatron_steps:
        bridge_factory.write_hf_export(step / bridge_iter, ckpt_factory.load_full_tensors(step / bridge_iter))
    root = megatron_steps[0].parent
    out = root / "pma" / "step_30"
    out.parent.mkdir()
    r = cli("merge", "--save-dir", root, "--num-models", "3", "--method", "wma", "-o", out, "--merge-hf-export",
            "-q")
    assert r.returncode == 0, r.stderr
    assert_tensors_close(_st_tensors(out / bridge_iter / "hf"),
                         reference_merge([_st_tensors(s / bridge_iter / "hf") for s in megatron_steps],
                                         schedules.wma(3)))
    prov = json.loads((out / "pma_provenance.json").read_text())
    assert prov["hf"].startswith("merged") and "left_out" not in prov


def _nemo_rl_resume_paths(step: Path):
    """``CheckpointManager.get_resume_paths`` of the real NeMo-RL v0.7.0 source (../shared/upstream)."""
    import warnings

    from rl.nemo_rl_upstream import use

    with use("v0.7.0"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its "optimizer will be freshly initialized" note
        from nemo_rl.utils.checkpoint import CheckpointManager

        return CheckpointManager.get_resume_paths(step)


@pytest.mark.parametrize("optimizer", ["drop", "keep-last-moments", "average"])
def test_merge_dtensor_backend_into_a_step_folder_that_loads_back(dtensor_steps, optimizer):
    root = dtensor_steps[0].parent
    before = tree_digest(root)
    out = root / "pma" / "step_30"
    out.parent.mkdir()
    r = cli("merge", "--save-dir", root, "--num-models", "3", "-o", out, "-q", "--optimizer", optimizer)
    assert r.returncode == 0, r.stderr
    assert tree_digest(root).items() >= before.items()
    model_dir = out / "policy" / "weights" / "model"
    ref = reference_merge([_st_tensors(s / "policy/weights/model") for s in dtensor_steps], [1 / 3] * 3)
    merged = _st_tensors(model_dir)
    assert_tensors_close(merged, ref)
    said = json.loads((out / "pma_provenance.json").read_text())["optimizer_state"]
    if optimizer == "drop":  # left out, and said so
        assert not (out / "policy" / "optimizer").exists() and "left out" in said
    elif optimizer == "keep-last-moments":  # the newest step's moments and step counts, as saved
        assert tree_digest(out / "policy" / "optimizer") == tree_digest(dtensor_steps[-1] / "policy" / "optimizer")
        assert "newest" in said
    else:  # moments averaged, step counts the newest's; torch's DCP reads it back
        states = [ckpt_factory.load_full_tensors(s / "policy/optimizer/optim") for s in dtensor_steps]
        ref = reference_merge(states, [1 / 3] * 3)
        ref.update({k: v for k, v in states[-1].items() if k.endswith(".step")})
        assert any(k.endswith(".exp_avg_sq") for k in ref) and {v.item() for k, v in ref.items() if k.endswith(".step")} == {3}
        assert_tensors_close(ckpt_factory.load_full_tensors(out / "policy/optimizer/optim"), ref)
        assert "averaged" in said
    for rel in ("config.yaml", "training_info.json", "train_dataloader.pt", "policy/tokenizer",
                "policy/weights/model/config.json", "policy/weights/model/model.safetensors.index.json"):
        assert tree_digest(out / rel) == tree_digest(dtensor_steps[-1] / rel), rel
    sd = transformers.LlamaForCausalLM.from_pretrained(model_dir).state_dict()  # as a policy.model_name
    for k, v in merged.items():
        assert torch.equal(sd[k], v), k


def test_watch_merges_each_new_step(dtensor_steps):
    root = dtensor_steps[0].parent
    r = cli("watch", "--save-dir", root, "--num-models", "2", "--once", "--backfill")
    assert r.returncode == 0, r.stderr
    merged = sorted(p.name for p in (root / "pma").iterdir() if not p.name.startswith("."))
    assert merged == ["step_20", "step_30"]  # NeMo-RL step folders: the windows ending at 20 and 30
    r = cli("watch", "--save-dir", root, "--num-models", "2", "--once")
    assert r.returncode == 0, r.stderr  # nothing left to do, nothing redone
    assert sorted(p.name for p in (root / "pma").iterdir() if not p.name.startswith(".")) == merged


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def _bad_tmp_step_named(steps, tmp):
    t = steps[0].parent / "tmp_step_40"
    shutil.copytree(steps[-1], t)
    return [steps[0], t], "tmp_step_40: a NeMo-RL save in flight"


def _bad_mixed_backends(steps, tmp):
    other = make_dtensor_steps(tmp / "other", steps=(40,))
    return [*steps, *other], "NeMo-RL (Megatron backend)"


def _bad_save_dir_with_both_backends(steps, tmp):
    make_dtensor_steps(steps[0].parent, steps=(40,))
    return ["--save-dir", steps[0].parent, "--num-models", "2"], "holds steps of two NeMo-RL backends"


def _bad_dtensor_optimizer_average_without_one(steps, tmp):
    other = make_dtensor_steps(tmp / "other", steps=(40, 50))
    shutil.rmtree(other[0] / "policy" / "optimizer" / "optim")
    return ["--optimizer", "average", *other], "step_40: no policy/optimizer/optim/.metadata"


def _bad_dtensor_keep_moments_without_optimizer(steps, tmp):
    other = make_dtensor_steps(tmp / "other", steps=(40, 50))
    shutil.rmtree(other[-1] / "policy" / "optimizer")
    return ["--optimizer", "keep-last-moments", *other], "no policy/optimizer/"


@pytest.mark.parametrize("case", [_bad_tmp_step_named, _bad_mixed_backends, _bad_save_dir_with_both_backends,
                                  _bad_dtensor_optimizer_average_without_one,
                                  _bad_dtensor_keep_moments_without_optimizer])
def test_bad_nemo_rl_input(case, megatron_steps, tmp_path):
    args, expected = case(megatron_steps, tmp_path)
    out = tmp_path / "out"
    r = cli("merge", *args, "-o", out, "-q")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert not out.exists()


def test_inspect_shows_steps_of_both_backends(megatron_steps, tmp_path):
    dtensor = make_dtensor_steps(tmp_path / "dt", steps=(7,))
    r = cli("inspect", megatron_steps[-1])
    assert r.returncode == 0 and "iteration 30" in r.stdout, r.stderr
    r = cli("inspect", dtensor[0])
    assert r.returncode == 0 and "iteration 7" in r.stdout, r.stderr
    assert "NeMo-RL (DTensor backend): safetensors" in r.stdout
    r = cli("inspect", dtensor[0].parent)  # a checkpoint dir: a table of every step
    assert r.returncode == 0 and "1 complete checkpoints" in r.stdout and "step_7" in r.stdout, r.stderr


class _Eval:
    """A pickle that would run ``eval`` when loaded (issue 16's payload, planted beside the weights)."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return eval, (f"open({str(self.sentinel)!r}, 'w').close()",)


@pytest.mark.parametrize("planted", ["train_dataloader.pt", "policy/optimizer/optim/evil_sched.pt"])
def test_pickles_beside_dtensor_weights_pass_the_allowlist(dtensor_steps, tmp_path, planted):
    """A DTensor step's pickles (copied from the newest into the output) are refused like any
    checkpoint pickle: exit 2, the line names builtins.eval, the payload never runs, nothing written."""
    sentinel = tmp_path / "SENTINEL"
    torch.save({"state": _Eval(sentinel)}, dtensor_steps[-1] / planted)
    out = tmp_path / "merged" / "step_30"
    r = cli("merge", *dtensor_steps, "-o", out, "--optimizer", "average")
    assert r.returncode == 2 and "builtins.eval" in r.stderr, r.stderr
    assert not sentinel.exists() and not out.exists()
