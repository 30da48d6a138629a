"""NeMo-RL DTensor-backend steps written by the REAL NeMo Automodel checkpointer (on CPU, gloo),
merged, and loaded back by the same code that wrote them.

The writers (tests/automodel_factory.py, tests/fixtures/save_automodel_steps.py): NeMo-RL v0.7.0's
own ``AutomodelCheckpointManager.save_checkpoint`` over nemo-automodel 0.4.0, and nemo-automodel
0.7.0's ``Checkpointer.save_model`` / ``save_optimizer`` with NeMo-RL's arguments; 1 rank, and 2
FSDP2 ranks (each rank's rows in its own ``shard-0000r-model-00001-of-00001.safetensors``, offsets in
``__metadata__``'s ``DCP_SHARDING_INFO``; ``save_consolidated`` adds ``consolidated/`` with the
full tensors). A merge is file by file, tensor by tensor, elementwise: every rank file of the
output holds the same rows as the newest's, averaged, so its header (offsets included) stays right.
"""

import json
from pathlib import Path

import pytest
import torch

import automodel_factory
import ckpt_factory
from helpers import assert_tensors_close, cli, reference_merge, tree_digest
from test_nemo_rl_layout import nemo_rl_step_files

pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# (writer, ranks, save_consolidated): NeMo-RL's own manager with its default config (no consolidated/
# export) on 1 and 2 FSDP2 ranks, and Automodel 0.7.0 on 2 ranks with the consolidated export
CASES = [("nemo-rl", 1, False), ("nemo-rl", 2, False), ("automodel", 2, True)]
IDS = [f"{w}-{r}rank{'-consolidated' if c else ''}" for w, r, c in CASES]


def _saved(writer, ranks, consolidated) -> list[Path]:
    try:
        return automodel_factory.saved_steps(writer, ranks, consolidated)
    except automodel_factory.Unavailable as e:
        pytest.skip(str(e))


@pytest.fixture(params=CASES, ids=IDS)
def automodel_steps(request, tmp_path) -> tuple[str, list[Path]]:
    """(writer, a writable NeMo-RL checkpoint dir's step folders)."""
    steps = automodel_factory.copy_steps(_saved(*request.param), tmp_path / "results")
    for step_dir, step in zip(steps, automodel_factory.STEPS):
        nemo_rl_step_files(step_dir, step, "dtensor")  # what NeMo-RL's CheckpointManager writes around policy/
    return request.param[0], steps


def _file_tensors(model_dir: Path) -> dict:
    """Every tensor of every safetensors file under ``model_dir``, as ``file:name``."""
    out = {}
    for f in sorted(model_dir.rglob("*.safetensors")):
        out.update({f"{f.relative_to(model_dir)}:{k}": v for k, v in safetensors_torch.load_file(f).items()})
    return out


def _assembled(model_dir: Path) -> dict:
    """The full tensors from Automodel's rank files (each piece at its ``DCP_SHARDING_INFO`` offsets)."""
    pieces = {}
    for f in sorted(model_dir.glob("shard-*.safetensors")):
        with safetensors_torch.safe_open(f, "pt") as st:
            offsets = json.loads(st.metadata()["DCP_SHARDING_INFO"])
            for k in st.keys():
                pieces.setdefault(k, []).append((offsets[k]["saved_offsets"], st.get_tensor(k)))
    out = {}
    for k, parts in pieces.items():
        shape = [max(o[d] + t.shape[d] for o, t in parts) for d in range(parts[0][1].dim())]
        full = torch.empty(shape, dtype=parts[0][1].dtype)
        for o, t in parts:
            full[tuple(slice(a, a + n) for a, n in zip(o, t.shape))] = t
        out[k] = full
    return out


def _merge(steps, optimizer) -> Path:
    root = steps[0].parent
    out = root / "pma" / "step_30"
    out.parent.mkdir()
    before = tree_digest(root)
    r = cli("merge", "--save-dir", root, "--num-models", "3", "-o", out, "-q", "--optimizer", optimizer)
    assert r.returncode == 0, r.stderr
    assert tree_digest(root).items() >= before.items()  # inputs untouched
    return out


@pytest.mark.parametrize("optimizer", ["drop", "keep-last-moments", "average"])
def test_merge_automodel_steps_equals_the_float64_reference(automodel_steps, optimizer):
    writer, steps = automodel_steps
    out = _merge(steps, optimizer)
    model = out / "policy" / "weights" / "model"
    inputs = [s / "policy" / "weights" / "model" for s in steps]
    # every file (each rank's rows, consolidated/) the elementwise average of the same file's
    assert_tensors_close(_file_tensors(model), reference_merge([_file_tensors(m) for m in inputs], [1 / 3] * 3))
    # rank files still say where their rows go, and consolidated/ holds the same full tensors
    full = _assembled(model)
    assert_tensors_close(full, reference_merge([_assembled(m) for m in inputs], [1 / 3] * 3))
    if (model / "consolidated").is_dir():
        assert_tensors_close(_file_tensors(model / "consolidated"),
                             {f"model-00001-of-00001.safetensors:{k}": v for k, v in full.items()})
    # everything beside the tensors is the newest's (Automodel's config.json, index, .hf_metadata/...)
    newest = {k: v for k, v in tree_digest(inputs[-1]).items() if not k.endswith(".safetensors")}
    assert {k: v for k, v in tree_digest(model).items() if not k.endswith(".safetensors")} == newest
    optim = out / "policy" / "optimizer"
    if optimizer == "drop":
        assert not optim.exists()
    elif optimizer == "keep-last-moments":
        assert tree_digest(optim) == tree_digest(steps[-1] / "policy" / "optimizer")
    else:  # moments averaged, step counts the newest's
        states = [ckpt_factory.load_full_tensors(s / "policy/optimizer/optim") for s in steps]
        ref = reference_merge(states, [1 / 3] * 3)
        ref.update({k: v for k, v in states[-1].items() if k.endswith(".step")})
        assert {v.item() for k, v in ref.items() if k.endswith(".step")} == {3}
        assert_tensors_close(ckpt_factory.load_full_tensors(optim / "optim"), ref)
    prov = json.loads((out / "pma_provenance.json").read_text())
    assert [i["iteration"] for i in prov["inputs"]] == list(automodel_factory.STEPS)


def test_merged_step_loads_back_through_automodel(automodel_steps, tmp_path):
    """The writer's own load path (NeMo-RL's ``load_checkpoint`` / Automodel's ``load_model`` +
    ``load_optimizer``, on 1 rank: a 2-rank save is resharded from its offsets) reads the merged
    step into a fresh model and optimizer: weights == reference, moments == the merged ones."""
    writer, steps = automodel_steps
    out = _merge(steps, "average")
    loaded = automodel_factory.load_back(writer, out, tmp_path / "loaded.pt")
    ref = reference_merge([_assembled(s / "policy/weights/model") for s in steps], [1 / 3] * 3)
    assert_tensors_close(loaded["model"], ref)
    merged = {k.removeprefix("optim."): v for k, v in
              ckpt_factory.load_full_tensors(out / "policy/optimizer/optim").items() if k.startswith("optim.state.")}
    assert_tensors_close({k: v for k, v in loaded["optim"].items() if k.startswith("state.")}, merged)


def test_steps_saved_by_different_rank_counts_are_refused(tmp_path):
    """Rank files are matched by name: a step saved by 1 rank and steps saved by 2 are not one run's
    saves; one line names the missing file, exit 2, nothing written."""
    one = automodel_factory.copy_steps(_saved("nemo-rl", 1, False)[:1], tmp_path / "a")
    two = automodel_factory.copy_steps(_saved("nemo-rl", 2, False)[1:], tmp_path / "b")
    for s, step in zip([*one, *two], automodel_factory.STEPS):
        nemo_rl_step_files(s, step, "dtensor")
    out = tmp_path / "out"
    r = cli("merge", *one, *two, "-o", out, "-q")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "step_10: has no shard-00002-model-00001-of-00001.safetensors" in lines[0], r.stderr
    assert not out.exists()
