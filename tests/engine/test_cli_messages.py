"""The CLI points to the fix: a save dir where a checkpoint is expected, --num-models < 1, a single
input, long iteration lists, output parents that do not exist yet, and inspect's table."""

import json
import resource
import signal

import pytest

import ckpt_factory
from helpers import cli, tree_digest
from megatron_pma.schedules import summarize_iterations


@pytest.fixture
def save(gpt_tp2, tmp_path):
    return ckpt_factory.copy_run(gpt_tp2, tmp_path / "save")


def _one_line_error(r, message):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_save_dir_given_as_a_checkpoint_says_use_save_dir(save, tmp_path):
    r = cli("merge", save[0].parent, "-o", tmp_path / "m", "--quiet")
    _one_line_error(r, f"{save[0].parent}: is a save dir, not a checkpoint: use --save-dir")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("n", ["0", "-3"])
def test_num_models_below_one_is_refused_as_such(save, tmp_path, n):
    for args in (["--save-dir", save[0].parent], [*save]):
        r = cli("merge", *args, "--num-models", n, "-o", tmp_path / "m", "--quiet")
        _one_line_error(r, f"--num-models must be >= 1, got {n}")


def test_single_input_needs_allow_single(save, tmp_path):
    out = tmp_path / "m"
    for args in ([save[2]], ["--save-dir", save[0].parent, "--num-models", "1"]):
        r = cli("merge", *args, "-o", out, "--quiet")
        _one_line_error(r, f"{save[2]}: only one checkpoint to merge")
        assert "--allow-single" in r.stderr and not out.exists()
    r = cli("merge", save[2], "-o", out, "--quiet", "--allow-single")
    assert r.returncode == 0, r.stderr
    assert "merged 1 checkpoints" in r.stdout


def test_long_iteration_lists_are_summarised():
    assert summarize_iterations(range(10, 1000, 10)) == "10, 20, ..., 990 (99 iterations)"
    assert summarize_iterations([10, 20, 30]) == "10, 20, 30"
    assert summarize_iterations([]) == "none"


def test_too_few_checkpoints_lists_the_available_ones_briefly(tmp_path):
    """select_window's message on a save dir with many checkpoints (their contents are never read)."""
    from megatron_pma.layouts import select_window
    from megatron_pma.errors import PMAError

    run = tmp_path / "run"
    for it in range(10, 1000, 10):
        (run / f"iter_{it:07d}").mkdir(parents=True)
        (run / f"iter_{it:07d}" / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (run / "latest_checkpointed_iteration.txt").write_text("990")
    with pytest.raises(PMAError, match=r"need 5 checkpoints spaced 300 iterations apart, found 4 "
                                       r"\(available iterations: 10, 20, \.\.\., 990 \(99 iterations\)\)"):
        select_window(run, 5, interval_iters=300)


def test_output_parents_are_created(save, tmp_path):
    out = tmp_path / "new" / "deeper" / "iter_0000030"
    r = cli("merge", *save, "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert (out / "metadata.json").is_file()
    assert (out.parent / "latest_checkpointed_iteration.txt").read_text() == "30"


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_output_parents_created_are_removed_when_the_merge_fails(save, tmp_path):
    """Fails mid-write (file size limit), after the staging folder was made in the new parent."""
    before = tree_digest(tmp_path / "save")
    out = tmp_path / "new" / "deeper" / "iter_0000030"
    r = cli("merge", *save, "-o", out, "--quiet", preexec_fn=_limit_file_size)
    _one_line_error(r, "write failed")
    assert not (tmp_path / "new").exists()
    assert tree_digest(tmp_path / "save") == before


def test_inspect_save_dir_prints_a_table_and_json(save):
    r = cli("inspect", save[0].parent)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].endswith("tracker -> 30, 3 complete checkpoints")
    assert lines[1].split()[:3] == ["iteration", "tokens", "size"]
    rows = [line.split() for line in lines[2:5]]
    assert [row[0] for row in rows] == ["10", "20", "30"]
    assert [row[-1] for row in rows] == ["iter_0000010", "iter_0000020", "iter_0000030"]
    assert "TP=2" in lines[2] and "{" not in r.stdout and "[" not in r.stdout
    info = json.loads(cli("inspect", save[0].parent, "--json").stdout)
    assert info["tracker"] == 30 and [c["iteration"] for c in info["checkpoints"]] == [10, 20, 30]


def test_inspect_checkpoint_prints_fields_and_keys(save):
    r = cli("inspect", save[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{save[1]}: iteration 20, ")
    assert "parallel         TP=2" in r.stdout
    assert any(line.split()[:1] == ["embedding.word_embeddings.weight"] for line in r.stdout.splitlines())
