"""Bad input: one line on stderr naming the file or key, a non-zero exit, no output (not even a
staging folder), and every input byte-identical afterwards."""

import os
import resource
import signal
import shutil
from pathlib import Path

import pytest
import torch

import ckpt_factory
from helpers import cli, tree_digest
from megatron_pma.checkpoint import dcp


@pytest.fixture
def save(gpt_tp2, tmp_path):
    """A private copy of a real TP=2 run (3 checkpoints) that a case may damage."""
    return ckpt_factory.copy_run(gpt_tp2, tmp_path / "save")


def _nan_into(ckpt: Path, key: str):
    md = dcp.read_metadata(ckpt)
    idx, info = next((i, v) for i, v in md.storage_data.items() if i.fqn == key)
    path = str(ckpt / info.relative_path)
    with open(path, "rb") as f:
        loc = dcp.locate_tensor(f, path, info.offset, info.length)
    with open(path, "r+b") as f:
        f.seek(loc.data_offset)
        f.write(torch.tensor([float("nan")], dtype=loc.dtype.torch).view(torch.uint8).numpy().tobytes())


def _case_missing_path(save, tmp, request):
    return [tmp / "nope" / "iter_0000010", *save[1:]], "no such checkpoint"


def _case_no_metadata_json(save, tmp, request):
    (save[0] / "metadata.json").unlink()
    return save, "metadata.json"


def _case_no_dcp_metadata(save, tmp, request):
    (save[1] / ".metadata").unlink()
    return save, ".metadata"


def _case_truncated_distcp(save, tmp, request):
    f = sorted(save[1].glob("*.distcp"))[0]
    os.truncate(f, f.stat().st_size // 2)
    return save, "truncated"


def _case_corrupt_pickle(save, tmp, request):
    (save[2] / ".metadata").write_bytes(b"\x80\x04garbage")
    return save, "unreadable DCP metadata"


def _case_shape_mismatch(save, tmp, request):
    other = ckpt_factory.cached_run("tp1_2layers", tp=1, num_layers=2, iterations=(40,))
    return [*save, other[0]], "has shape [4, 256]"


def _case_dtype_mismatch(save, tmp, request):
    return [save[0], save[1], request.getfixturevalue("gpt_bf16")[2]], "dtype torch.float32"


def _case_layout_mismatch(save, tmp, request):
    return [save[0], save[1], request.getfixturevalue("gpt_tp1_optim")[2]], "sharded differently"


def _case_key_missing(save, tmp, request):
    other = request.getfixturevalue("gpt_tp1_optim")[2]
    return [save[0], save[1], other, "--optimizer", "average"], "missing key optimizer."


def _case_nan(save, tmp, request):
    _nan_into(save[1], "decoder.layers.mlp.linear_fc1.weight")
    return save, "NaN/Inf"


def _case_same_checkpoint_twice(save, tmp, request):
    return [save[0], save[1], Path(str(save[1]) + "/")], "given twice"


def _case_duplicate_iteration(save, tmp, request):
    copy = tmp / "copy_of_20"
    shutil.copytree(save[1], copy / "iter_0000020")
    return [save[0], save[1], copy / "iter_0000020"], "duplicate iteration 20"


def _case_bad_weights(save, tmp, request):
    return [*save, "--method", "custom", "--weights", "0.5,0.4,0.3"], "sum to 1.2"


def _case_output_exists(save, tmp, request):
    return save, "already exists"


def _case_not_a_directory(save, tmp, request):
    f = tmp / "file.txt"
    f.write_text("x")
    return [*save, f], "not a directory"


def _case_empty_dir(save, tmp, request):
    (tmp / "empty").mkdir()
    return [*save, tmp / "empty"], "metadata.json"


def _case_dangling_symlink(save, tmp, request):
    link = tmp / "iter_0000040"
    link.symlink_to(tmp / "gone")
    return [*save, link], "dangling symbolic link"


def _case_mixed_formats(save, tmp, request):
    """A real legacy --ckpt-format torch checkpoint (Megatron-LM's save) among torch_dist ones."""
    legacy = request.getfixturevalue("legacy_bf16")[2]
    return [save[0], save[1], legacy], "mixed checkpoint formats"


def _case_unreadable_common_state(save, tmp, request):
    (save[0] / "common.pt").write_bytes(b"PK\x03\x04 not a zip")
    return save, "unreadable common state"


def _case_release_tracker(save, tmp, request):
    (save[0].parent / "latest_checkpointed_iteration.txt").write_text("release")
    return ["--save-dir", save[0].parent, "--num-models", "3"], "says 'release'"


def _case_tracker_names_missing_iteration(save, tmp, request):
    (save[0].parent / "latest_checkpointed_iteration.txt").write_text("40")
    return ["--save-dir", save[0].parent, "--num-models", "3"], "names iteration 40, but iter_0000040 is missing"


def _case_too_few_checkpoints(save, tmp, request):
    return ["--save-dir", save[0].parent, "--num-models", "4"], "need 4 checkpoints, found 3"


CASES = {name[len("_case_"):]: fn for name, fn in globals().items() if name.startswith("_case_")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, save, tmp_path, request):
    args, message = CASES[case](save, tmp_path, request)
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()
    if case == "output_exists":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    before = tree_digest(tmp_path / "save")
    r = cli("merge", *args, "--output", out, "--quiet")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert tree_digest(tmp_path / "save") == before
    if case == "output_exists":
        assert (out / "keep.txt").read_text() == "precious"
    else:
        assert not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == (["merged"] if case == "output_exists" else [])


def test_nonfinite_allowed_on_request(save, tmp_path):
    _nan_into(save[1], "decoder.layers.mlp.linear_fc1.weight")
    r = cli("merge", *save, "--output", tmp_path / "m", "--quiet", "--allow-nonfinite")
    assert r.returncode == 0, r.stderr


def test_force_replaces_output_and_never_touches_inputs(save, tmp_path):
    out = tmp_path / "m"
    assert cli("merge", *save, "--output", out, "--quiet").returncode == 0
    before = tree_digest(tmp_path / "save")
    r = cli("merge", *save, "--output", out, "--quiet", "--force", "--method", "wma")
    assert r.returncode == 0, r.stderr
    assert '"method": "wma"' in (out / "pma_provenance.json").read_text()
    assert tree_digest(tmp_path / "save") == before
    r = cli("merge", *save, "--output", save[2], "--quiet", "--force")
    assert r.returncode == 2 and "overwrite or nest inside input" in r.stderr
    assert tree_digest(tmp_path / "save") == before


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_disk_full_mid_write(save, tmp_path):
    before = tree_digest(tmp_path / "save")
    out = tmp_path / "out" / "iter_0000030"
    out.parent.mkdir()
    r = cli("merge", *save, "--output", out, "--quiet", preexec_fn=_limit_file_size)
    assert r.returncode == 2, r.stderr
    assert "write failed" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert list(out.parent.iterdir()) == []  # no output, no staging dir, no tracker
    assert tree_digest(tmp_path / "save") == before


# ------------------------------------------------------------------------------ permission denied
# Root bypasses file permissions (CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH), and CI runs as root. The
# merge then runs as root without those two capabilities (dropped from the bounding set before exec,
# so the new program never gets them): the owner's mode bits apply to it as to any user. Not root:
# the mode bits already apply.

_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _PR_CAPBSET_DROP = 1, 2, 24


def _without_file_privileges():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _unprivileged_preexec(probe: Path):
    """A preexec_fn under which ``probe`` (mode 000) cannot be read; skips where none exists."""
    import subprocess
    import sys

    preexec = _without_file_privileges if os.geteuid() == 0 else None
    probe.write_text("secret")
    probe.chmod(0)
    try:
        r = subprocess.run([sys.executable, "-c", f"open({str(probe)!r}).read()"], capture_output=True,
                           text=True, preexec_fn=preexec)
    except subprocess.SubprocessError as e:  # prctl refused (no CAP_SETPCAP)
        pytest.skip(f"cannot drop the file-permission capabilities here: {e}")
    finally:
        probe.chmod(0o600)
        probe.unlink()
    if r.returncode == 0 or "PermissionError" not in r.stderr:
        pytest.skip("file permissions are not enforced for this user here")
    return preexec


def _perm_distcp(save, out):
    f = sorted(save[1].glob("*.distcp"))[1]
    return [*save], [f], f"{f}: permission denied"


def _perm_common_pt(save, out):
    f = save[2] / "common.pt"
    return [*save], [f], f"{f}: permission denied"


def _perm_checkpoint_dir(save, out):
    return [*save], [save[1]], f"{save[1]}: permission denied"


def _perm_checkpoint_dir_in_save_dir(save, out):
    return ["--save-dir", save[0].parent, "--num-models", "3"], [save[1]], f"{save[1]}: permission denied"


def _perm_output_parent(save, out):
    return [*save], [out.parent], f"{out.parent}: permission denied"


def _perm_output_parent_save_dir(save, out):
    return ["--save-dir", save[0].parent, "--num-models", "2"], [out.parent], f"{out.parent}: permission denied"


PERM_CASES = {name[len("_perm_"):]: fn for name, fn in globals().items() if name.startswith("_perm_")}


@pytest.mark.parametrize("case", sorted(PERM_CASES))
def test_permission_denied(case, save, tmp_path):
    """An unreadable .distcp / common.pt / checkpoint dir, an unwritable output parent: one line
    naming the path and saying 'permission denied', exit 2, no output, inputs byte-identical."""
    preexec = _unprivileged_preexec(tmp_path / "probe")
    out = tmp_path / "out" / "iter_0000030"
    out.parent.mkdir()
    args, locked, message = PERM_CASES[case](save, out)
    modes = {p: p.stat().st_mode for p in locked}
    for p in locked:
        p.chmod(0o555 if p == out.parent else 0)  # an output parent stays listable, not writable
    try:
        before = tree_digest(tmp_path / "save")
        r = cli("merge", *args, "--output", out, "--quiet", preexec_fn=preexec)
        after = tree_digest(tmp_path / "save")
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert after == before
    assert list(out.parent.iterdir()) == []  # no output, no staging folder, no tracker
