"""Fast checks of the launcher: argv splitting, option validation, the one-line failure when
the installed Megatron lacks the structure, and (via ast, without importing it) that the
names and shapes the hook relies on are in the 0.19.2 wheel's megatron/training source."""

from __future__ import annotations

import ast
import subprocess
import sys
import types

import pytest

from conftest import REPO, subprocess_env
from megatron_pma.training import megatron_lm as ml


def test_split_pma_args_keeps_order_and_forms():
    argv = ["pretrain_gpt.py", "--num-layers", "2", "--pma-num-models", "4", "--save", "/s",
            "--pma-method=ema", "--pma-alpha", "-0.5", "--lr", "1e-4", "--pma-output-root", "/o",
            "--pma-interval-iters", "100", "--async-save"]
    ours, rest = ml.split_pma_args(argv)
    assert rest == ["pretrain_gpt.py", "--num-layers", "2", "--save", "/s", "--lr", "1e-4", "--async-save"]
    ns = ml.parse_pma_args(ours)
    assert (ns.pma_num_models, ns.pma_method, ns.pma_alpha, ns.pma_output_root,
            ns.pma_interval_iters, ns.pma_optimizer) == (4, "ema", -0.5, "/o", 100, "drop")


@pytest.mark.parametrize("tokens, message", [
    (["--pma-method", "ema"], "required: --pma-num-models"),
    (["--pma-num-models", "0"], "must be >= 1"),
    (["--pma-num-models", "2", "--pma-method", "custom"], "needs --pma-weights"),
    (["--pma-num-models", "2", "--pma-weights", "0.5,0.2,0.3"], "has 3 values"),
    (["--pma-num-models", "2", "--pma-optimizer", "keep"], "invalid choice"),
])
def test_bad_pma_options(tokens, message, capsys):
    with pytest.raises(SystemExit) as ei:
        ml.parse_pma_args(tokens)
    text = (ei.value.code if isinstance(ei.value.code, str) else "") + capsys.readouterr().err
    assert message in text


def test_launcher_fails_with_one_line_naming_the_version(tmp_path):
    """The venv's megatron-core (0.16.x) has no megatron/training: one line, exit 2, script
    never run."""
    import importlib.util
    from importlib.metadata import version

    if importlib.util.find_spec("megatron") and any(
            (__import__("pathlib").Path(p) / "training" / "checkpointing.py").exists()
            for p in importlib.util.find_spec("megatron").submodule_search_locations or []):
        pytest.skip("this environment's megatron has megatron/training")
    script = tmp_path / "train.py"
    marker = tmp_path / "ran"
    script.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    r = subprocess.run([sys.executable, "-m", "megatron_pma.training.megatron_lm", str(script),
                        "--save", str(tmp_path), "--pma-num-models", "2"],
                       capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert f"megatron-core {version('megatron-core')}" in lines[0] and "cannot" in lines[0]
    assert not marker.exists()


def test_check_structure_names_what_is_missing():
    mod = types.ModuleType("fake_checkpointing")

    def save_checkpoint(iteration, model):  # no iter_finalize_fn, no schedule_async_save
        return None

    mod.save_checkpoint = save_checkpoint
    mod.get_checkpoint_tracker_filename = lambda d: d
    with pytest.raises(ml.InterceptionError) as ei:
        ml.install(lambda it, d: None, module=mod)
    msg = str(ei.value)
    assert "\n" not in msg and "megatron-core" in msg
    assert "no schedule_async_save()" in msg and "defines no iter_finalize_fn" in msg
    assert mod.save_checkpoint is save_checkpoint  # nothing was changed


def test_stand_in_rank_nonzero_and_failing_callback(tmp_path, monkeypatch):
    """Logic not reachable with one real process: rank != 0 never reports; an exception in
    the callback is logged and does not reach the training loop. The stand-in has the
    0.19.2 shape (checked against the wheel by test_wheel_source_has_the_hooked_structure)."""
    save = str(tmp_path)
    args = types.SimpleNamespace(save=save, async_save=False)
    mod = types.ModuleType("stand_in_checkpointing")
    mod.get_args = lambda: args
    mod.get_checkpoint_tracker_filename = lambda d: f"{d}/latest_checkpointed_iteration.txt"
    mod.schedule_async_save = lambda req: None

    def save_checkpoint(iteration, model, optimizer, opt_param_scheduler, flops,
                        non_persistent_ckpt=False, release=False):
        tracker_filename = mod.get_checkpoint_tracker_filename(args.save)

        def iter_finalize_fn():
            with open(tracker_filename, "w") as f:
                f.write(str(iteration))

        if args.async_save:
            schedule_async_save(None)  # noqa: F821 (name checked, never reached here)
        iter_finalize_fn()

    mod.save_checkpoint = save_checkpoint
    calls = []

    def cb(it, d):
        calls.append(it)
        if it == 2:
            raise RuntimeError("boom")

    inst = ml.install(cb, module=mod)
    try:
        monkeypatch.setattr(ml, "_is_rank0", lambda: False)
        mod.save_checkpoint(1, None, None, None, 0)
        assert calls == []
        monkeypatch.setattr(ml, "_is_rank0", lambda: True)
        mod.save_checkpoint(2, None, None, None, 0)  # callback raises: swallowed
        mod.save_checkpoint(3, None, None, None, 0)
        assert calls == [2, 3] and inst.fired == [2, 3]
    finally:
        inst.uninstall()
    assert mod.save_checkpoint is save_checkpoint


def _func(tree, name):
    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)


def test_wheel_source_has_the_hooked_structure(mcore_0192_site):
    """What the unpatched hook relies on, read from the 0.19.2 wheel's source with ast."""
    ck = ast.parse((mcore_0192_site / "megatron/training/checkpointing.py").read_text())
    save = _func(ck, "save_checkpoint")
    assert save.args.args[0].arg == "iteration"
    assert {"non_persistent_ckpt", "release"} <= {a.arg for a in save.args.args}
    calls = {ast.unparse(n.func) for n in ast.walk(save) if isinstance(n, ast.Call)}
    assert "schedule_async_save" in calls and "get_checkpoint_tracker_filename" in calls
    assert "async_save_request.add_finalize_fn" in calls
    fins = [n for n in ast.walk(save) if isinstance(n, ast.FunctionDef) and n.name == "iter_finalize_fn"]
    writes = [n for f in fins for n in ast.walk(f) if isinstance(n, ast.With)
              and "tracker_filename, 'w'" in ast.unparse(n.items[0])]
    assert writes, "iter_finalize_fn no longer writes the tracker"
    imports = {a.name for n in ck.body if isinstance(n, ast.ImportFrom) and n.module == "async_utils"
               for a in n.names}
    assert "schedule_async_save" in imports
    assert ast.unparse(_func(ck, "get_checkpoint_tracker_filename")).count(ml.TRACKER_NAME) == 1
    # training.py binds save_checkpoint by name (so the launcher rebinds it there too).
    tr = ast.parse((mcore_0192_site / "megatron/training/training.py").read_text())
    assert any(isinstance(n, ast.ImportFrom) and n.module == "megatron.training.checkpointing"
               and "save_checkpoint" in {a.name for a in n.names} for n in tr.body)


STAND_IN_CHECKPOINTING = '''
"""Stand-in for megatron/training/checkpointing.py with the 0.19.2 shape (sync path only)."""
import os
from types import SimpleNamespace

ARGS = SimpleNamespace(save=None, async_save=False)


def get_args():
    return ARGS


def get_checkpoint_tracker_filename(checkpoints_path):
    return os.path.join(checkpoints_path, "latest_checkpointed_iteration.txt")


def schedule_async_save(async_request):
    raise AssertionError("sync only")


def save_checkpoint(iteration, model, optimizer, opt_param_scheduler, flops,
                    non_persistent_ckpt=False, release=False):
    args = get_args()
    os.makedirs(os.path.join(args.save, f"iter_{iteration:07d}"))
    open(os.path.join(args.save, f"iter_{iteration:07d}", "metadata.json"), "w").write("{}")
    tracker_filename = get_checkpoint_tracker_filename(args.save)

    def iter_finalize_fn():
        with open(tracker_filename, "w") as f:
            f.write(str(iteration))

    if args.async_save:
        schedule_async_save(None)
    iter_finalize_fn()
'''

TRAIN_SCRIPT = '''
import json, sys
from helper_next_to_script import SAVE_ITERS           # a sibling module, like gpt_builders
from megatron.training.checkpointing import ARGS, save_checkpoint

if __name__ == "__main__":
    ARGS.save = sys.argv[sys.argv.index("--save") + 1]
    for it in SAVE_ITERS:
        save_checkpoint(it, None, None, None, 0)
    json.dump(sys.argv, open(ARGS.save + "/argv.json", "w"))
'''

RUNNER = '''
import json, sys
from megatron_pma.training import megatron_lm

class Rec:
    def __init__(self, save_dir, num_models, **kw):
        self.log = {"init": [save_dir, num_models, kw], "calls": [], "closed": False}
        Rec.inst = self
    def on_checkpoint_saved(self, it):
        import os
        self.log["calls"].append([it, open(os.path.join(self.log["init"][0],
                                   "latest_checkpointed_iteration.txt")).read()])
    def close(self):
        self.log["closed"] = True

rc = megatron_lm.main(sys.argv[1:], hook_factory=Rec)
import megatron.training.checkpointing as ck
print(json.dumps({"rc": rc, "log": Rec.inst.log, "module": ck.__file__}))
'''


def test_launcher_uses_the_scripts_megatron_and_runs_it_as_main(tmp_path):
    """A Megatron-LM-like checkout: the script's own megatron/ (a stand-in with the 0.19.2
    shape) is the one hooked; sibling imports work; --pma-* never reach the script."""
    import json

    repo = tmp_path / "Megatron-LM"
    (repo / "megatron" / "training").mkdir(parents=True)
    (repo / "megatron" / "training" / "__init__.py").write_text("")
    (repo / "megatron" / "training" / "checkpointing.py").write_text(STAND_IN_CHECKPOINTING)
    (repo / "helper_next_to_script.py").write_text("SAVE_ITERS = [100, 200]\n")
    (repo / "pretrain_fake.py").write_text(TRAIN_SCRIPT)
    save = tmp_path / "save"
    save.mkdir()
    r = subprocess.run([sys.executable, "-c", RUNNER, str(repo / "pretrain_fake.py"),
                        "--pma-num-models", "2", "--save", str(save), "--pma-method", "wma",
                        "--lr", "0.1"], capture_output=True, text=True, cwd=tmp_path,
                       env=subprocess_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["rc"] == 0
    assert out["module"] == str(repo / "megatron" / "training" / "checkpointing.py")
    assert out["log"]["init"][:2] == [str(save), 2] and out["log"]["init"][2]["method"] == "wma"
    assert out["log"]["calls"] == [[100, "100"], [200, "200"]] and out["log"]["closed"]
    assert json.loads((save / "argv.json").read_text()) == [
        str(repo / "pretrain_fake.py"), "--save", str(save), "--lr", "0.1"]
