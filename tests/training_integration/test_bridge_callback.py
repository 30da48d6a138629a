"""PMACallback fired by Megatron-Bridge 0.6.2's real ``CallbackManager`` on a save dir of real
megatron-core checkpoints, with the real engine merging in the hook's child process.

What is real: Bridge's ``callbacks.py`` (``normalize_callbacks`` -- what ``pretrain(...,
callbacks=[...])`` does with the list --, ``CallbackManager.fire``, ``CallbackContext``), loaded
from the pip-installed wheel; the checkpoints (the gpt_tp2 fixture, saved by megatron-core); the
merges (``PMAHook``'s default child process and engine).

What is a stand-in, because Bridge's train loop cannot run here (``megatron.bridge`` imports the
whole model zoo and Transformer Engine, needs Python >= 3.12 and megatron-core >= 0.19's training
config; ``GlobalState`` pulls tensorboard, NVRx and the tokenizers): the ``GlobalState`` passed in
the context (only ``cfg.checkpoint.save`` / ``most_recent_k`` and ``train_state.step``, the fields
the callback reads), and Bridge's ``save_checkpoint`` itself. ``bridge_save`` below does what its
rank-0 ``train_state_finalize_fn`` writes before the event fires (``checkpointing.py`` 0.6.2,
``save_checkpoint``; ``../shared/facts/megatron-bridge.md``): ``iter_N/train_state.pt`` (a dict of
0-d tensors, ``TrainState.state_dict()``), its copy ``latest_train_state.pt`` and the Megatron-LM
tracker at the save dir root; a global non-persistent save writes the same under
``<save>/non_persistent``, a local one none of them. An async save fires the same event from its
finalize step, when ``train_state.step`` has moved on: simulated by advancing it before firing.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import ckpt_factory
from bridge_site import BridgeUnavailable, install_bridge, load_module
from conftest import subprocess_env
from megatron_pma.errors import PMAError
from megatron_pma.training.bridge import PMACallback, tracked_iteration


@pytest.fixture(scope="module")
def callbacks_mod():
    try:
        site = install_bridge()
    except BridgeUnavailable as e:
        pytest.skip(str(e))
    return load_module(site, "megatron.bridge.training.callbacks")


def _state(save: Path, step: int = 0, most_recent_k: int = -1):
    """Stand-in for Bridge's GlobalState: the fields PMACallback reads."""
    return SimpleNamespace(cfg=SimpleNamespace(checkpoint=SimpleNamespace(save=str(save), most_recent_k=most_recent_k)),
                           train_state=SimpleNamespace(step=step))


def _train_state(step: int) -> dict:
    return {"step": torch.tensor(step), "consumed_train_samples": torch.tensor(step * 8),
            "skipped_train_samples": torch.tensor(0), "consumed_valid_samples": torch.tensor(0),
            "floating_point_operations_so_far": torch.tensor(0.0), "do_train": torch.tensor(True),
            "do_valid": torch.tensor(False), "do_test": torch.tensor(False)}


def bridge_save(src_ckpt: Path, save: Path, step: int) -> Path:
    """A persistent Bridge save of ``src_ckpt`` as ``save/iter_<step>``: the checkpoint, then rank 0's
    finalize writes (train_state.pt, latest_train_state.pt, the .txt tracker)."""
    dest = save / f"iter_{step:07d}"
    shutil.copytree(src_ckpt, dest)
    for p in [dest, *dest.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    torch.save(_train_state(step), dest / "train_state.pt")
    shutil.copy(dest / "train_state.pt", save / "latest_train_state.pt")
    (save / "latest_checkpointed_iteration.txt").write_text(str(step))
    return dest


def _fire(cb_mod, manager, event: str, state) -> None:
    manager.fire(event, cb_mod.CallbackContext(state=state, model=[], user_state=manager.user_state))


def _reference(ckpts: list[Path], keys) -> dict:
    """Independent reference: the float64 mean of the inputs, cast to their dtype."""
    tensors = [ckpt_factory.load_full_tensors(c, keys) for c in ckpts]
    return {k: (sum(t[k].double() for t in tensors) / len(tensors)).to(tensors[-1][k].dtype) for k in tensors[-1]}


def _assert_is_mean(output: Path, ckpts: list[Path]) -> None:
    out = ckpt_factory.load_full_tensors(output)
    model_keys = [k for k in out if not k.startswith("optimizer.")]
    assert model_keys and "decoder.final_layernorm.weight" in model_keys
    ref = _reference(ckpts, set(model_keys))
    for k in model_keys:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-6, atol=1e-7, msg=k)


def test_registers_only_its_events(callbacks_mod):
    manager = callbacks_mod.normalize_callbacks([PMACallback(2)])
    active = {e for e in manager.events if manager.has_callbacks(e)}
    assert active == {"on_train_start", "on_checkpoint_save", "on_train_end"}


def test_merges_on_bridge_saves_skips_non_persistent_and_waits_at_train_end(callbacks_mod, gpt_tp2, tmp_path):
    """Sync saves at 10 and 20, a global and a local non-persistent save at 25, an async save of 30
    finalized at step 35: merges end at the tracker's iterations only, and on_train_end waits."""
    save = tmp_path / "run"
    save.mkdir()
    cb = PMACallback(2, method="sma")
    manager = callbacks_mod.normalize_callbacks([cb])
    state = _state(save)
    _fire(callbacks_mod, manager, "on_train_start", state)
    assert cb.hook is None  # nothing starts before the first save

    ckpts = {}
    for step in (10, 20):
        state.train_state.step = step
        ckpts[step] = bridge_save(gpt_tp2[step // 10 - 1], save, step)
        _fire(callbacks_mod, manager, "on_checkpoint_save", state)
        assert cb.hook.wait(timeout=120)  # (test only: each merge done before the next event)

    state.train_state.step = 25
    bridge_save(gpt_tp2[2], save / "non_persistent", 25)  # global non-persistent: its own dir
    _fire(callbacks_mod, manager, "on_checkpoint_save", state)
    _fire(callbacks_mod, manager, "on_checkpoint_save", state)  # local non-persistent: no file at all

    state.train_state.step = 30
    ckpts[30] = bridge_save(gpt_tp2[2], save, 30)
    state.train_state.step = 35  # the async save finalizes later: training moved on
    _fire(callbacks_mod, manager, "on_checkpoint_save", state)
    _fire(callbacks_mod, manager, "on_train_end", state)  # no wait in between: on_train_end waits

    results = [(r.iteration, r.status) for r in cb.hook.results]
    assert results == [(10, "skipped"), (20, "ok"), (30, "ok")], cb.hook.results
    assert sorted(p.name for p in (save / "pma").glob("iter_*")) == ["iter_0000020", "iter_0000030"]
    assert (save / "pma" / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    _assert_is_mean(save / "pma" / "iter_0000020", [ckpts[10], ckpts[20]])
    _assert_is_mean(save / "pma" / "iter_0000030", [ckpts[20], ckpts[30]])
    assert [Path(p).name for p in cb.hook.results[-1].inputs] == ["iter_0000020", "iter_0000030"]


def test_resumed_run_merges_only_new_saves(callbacks_mod, gpt_tp2, tmp_path):
    """A run resumed from 20: a non-persistent save before the first persistent one finds the
    tracker still at 20 (seen at on_train_start) and starts nothing."""
    save = tmp_path / "run"
    save.mkdir()
    for step in (10, 20):
        bridge_save(gpt_tp2[step // 10 - 1], save, step)
    cb = PMACallback(2)
    manager = callbacks_mod.normalize_callbacks([cb])
    state = _state(save, step=20)
    _fire(callbacks_mod, manager, "on_train_start", state)
    state.train_state.step = 25
    _fire(callbacks_mod, manager, "on_checkpoint_save", state)
    assert cb.hook is None
    state.train_state.step = 30
    bridge_save(gpt_tp2[2], save, 30)
    _fire(callbacks_mod, manager, "on_checkpoint_save", state)
    _fire(callbacks_mod, manager, "on_train_end", state)
    assert [(r.iteration, r.status) for r in cb.hook.results] == [(30, "ok")]


def test_other_ranks_do_nothing(callbacks_mod, gpt_tp2, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # as Bridge's get_rank_safe before torch.distributed is up
    save = tmp_path / "run"
    save.mkdir()
    cb = PMACallback(2)
    manager = callbacks_mod.normalize_callbacks([cb])
    state = _state(save)
    _fire(callbacks_mod, manager, "on_train_start", state)
    for step in (10, 20):
        bridge_save(gpt_tp2[step // 10 - 1], save, step)
        _fire(callbacks_mod, manager, "on_checkpoint_save", state)
    _fire(callbacks_mod, manager, "on_train_end", state)
    assert cb.hook is None and not (save / "pma").exists()


def test_errors_never_reach_training(callbacks_mod, tmp_path, caplog):
    save = tmp_path / "run"
    save.mkdir()
    (save / "latest_train_state.pt").write_bytes(b"not a torch file")
    cb = PMACallback(2)
    manager = callbacks_mod.normalize_callbacks([cb])
    with caplog.at_level(logging.WARNING, logger="megatron_pma.training.bridge"):
        _fire(callbacks_mod, manager, "on_checkpoint_save", _state(save, step=10))  # does not raise
    assert cb.hook is None and "ignored" in caplog.text


def test_tracked_iteration_reads_bridge_tracker_first(tmp_path):
    assert tracked_iteration(tmp_path) is None
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    assert tracked_iteration(tmp_path) is None
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("40\n")
    assert tracked_iteration(tmp_path) == 40
    torch.save(_train_state(50), tmp_path / "latest_train_state.pt")
    with pytest.raises(PMAError, match="disagree"):  # a save cut between its two trackers
        tracked_iteration(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").unlink()
    assert tracked_iteration(tmp_path) == 50


def test_bad_num_models():
    with pytest.raises(ValueError, match="num_models"):
        PMACallback(0)


def test_launcher_points_bridge_scripts_to_the_callback(tmp_path):
    """``python -m megatron_pma.training.megatron_lm`` on a script that trains through Bridge: one
    line naming PMACallback, exit 2, the script never runs."""
    marker = tmp_path / "ran"
    script = tmp_path / "train_bridge.py"
    script.write_text("from megatron.bridge.training.pretrain import pretrain\n"
                      f"open({str(marker)!r}, 'w').close()\n")
    r = subprocess.run([sys.executable, "-m", "megatron_pma.training.megatron_lm", str(script),
                        "--pma-num-models", "2"], capture_output=True, text=True, env=subprocess_env(),
                       timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    [line] = r.stderr.strip().splitlines()
    assert "Megatron-Bridge" in line and "PMACallback" in line and str(script) in line
    assert not marker.exists()


def test_import_needs_neither_torch_nor_bridge():
    code = ("import sys; from megatron_pma.training.bridge import PMACallback; "
            "assert 'torch' not in sys.modules and 'megatron' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env(), timeout=120)


def test_warns_when_bridge_retention_is_shorter_than_the_window(callbacks_mod, gpt_tp2, tmp_path, caplog):
    save = tmp_path / "run"
    save.mkdir()
    bridge_save(gpt_tp2[0], save, 10)
    cb = PMACallback(3)
    manager = callbacks_mod.normalize_callbacks([cb])
    with caplog.at_level(logging.WARNING, logger="megatron_pma.training.bridge"):
        _fire(callbacks_mod, manager, "on_checkpoint_save", _state(save, step=10, most_recent_k=2))
        _fire(callbacks_mod, manager, "on_train_end", _state(save, step=10, most_recent_k=2))
    assert "most_recent_k=2" in caplog.text
    assert [(r.iteration, r.status) for r in cb.hook.results] == [(10, "skipped")]  # too few yet
