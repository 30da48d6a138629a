"""`megatron-pma sweep` and `merge --method wsm` on real megatron-core checkpoints (fixture runs with
iterations 10, 20, 30), scored by real evaluators that read the merged weights."""

import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import cli, tree_digest
from megatron_pma import schedules
from megatron_pma.commands import sweep as sw

EVAL_SCRIPT = Path(__file__).resolve().parent.parent / "fixtures" / "sweep_eval.py"


def _embedding_mean(ckpt: Path) -> float:
    """Plain-torch DCP read (no megatron, no process group) of the word-embedding mean."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = Path(ckpt).parent / "eval.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    try:
        return torch.load(out, weights_only=False)["embedding.word_embeddings.weight"].double().mean().item()
    finally:
        out.unlink()


def test_sweep_api_callable_scores_each_merge_and_records_failures(gpt_tp2, tmp_path):
    """The evaluator is linear in the weights, so each merge must score sum_j c_j * score(theta_j)."""
    save = gpt_tp2[0].parent
    before = tree_digest(save)
    inputs = {10: _embedding_mean(gpt_tp2[0]), 20: _embedding_mean(gpt_tp2[1]), 30: _embedding_mean(gpt_tp2[2])}
    assert len(set(inputs.values())) == 3  # the run moved: the check below can fail
    seen = []

    def evaluator(path):
        seen.append(Path(path))
        if "trial005" in str(path):  # wsm:minus-sqrt, window 20 (methods vary fastest)
            raise RuntimeError("evaluator crashed on purpose")
        return _embedding_mean(path)

    scratch = tmp_path / "scratch"
    res = sw.sweep(save, evaluator, windows=[10, 20, 40], num_models=[3], scratch=scratch,
                   methods=["sma", "wsm:cosine", "wsm:minus-sqrt"])
    assert res.last.loss == pytest.approx(inputs[30], rel=1e-12) and res.last.iterations == [30]
    by = {(t.method, t.window): t for t in res.trials}
    for m in ("sma", "wsm:cosine"):
        t = by[(m, 20.0)]
        assert t.iterations == [10, 20, 30] and t.error is None
        assert t.weights == pytest.approx(schedules.weights(m, 3))
        assert t.loss == pytest.approx(sum(c * inputs[i] for c, i in zip(t.weights, t.iterations)), rel=1e-5)
    failed = by[("wsm:minus-sqrt", 20.0)]
    assert failed.loss is None and "crashed on purpose" in failed.error and failed.iterations == [10, 20, 30]
    for m in ("sma", "wsm:cosine", "wsm:minus-sqrt"):  # 40 iterations with 3 checkpoints: 20 apart, only 2 exist
        assert by[(m, 40.0)].loss is None and "does not fit" in by[(m, 40.0)].error
        assert "span at least 20 iterations" in by[(m, 10.0)].error  # 3 consecutive saves need 20
    assert res.best.method in ("sma", "wsm:cosine")
    assert list(scratch.iterdir()) == []  # every merge removed once scored
    assert all(p.name == "iter_0000030" for p in seen) and len(seen) == 4
    assert tree_digest(save) == before  # inputs untouched
    table = sw.table(res)
    assert "failed" in table and "n/a" in table and "best:" in table
    json.dumps(res.to_json())


@pytest.mark.slow
def test_sweep_cli_real_evaluator_failure_heatmap_keep_best(gpt_tp2, tmp_path):
    save = gpt_tp2[0].parent
    out, scratch, best = tmp_path / "out", tmp_path / "scratch", tmp_path / "best" / "iter_0000030"
    best.parent.mkdir()
    cmd = f"{sys.executable} {EVAL_SCRIPT} {{ckpt}} --fail-if trial001"
    p = cli("sweep", "--save-dir", save, "--windows", "20,40", "--num-models", "2,3", "--methods", "sma,wsm:cosine",
            "--eval-cmd", cmd, "--out", out, "--scratch", scratch, "--keep-best", best, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads((out / "sweep.json").read_text())
    by = {(t["method"], t["window"], t["num_models"]): t for t in res["trials"]}
    s30 = res["last"]["loss"]
    sma2, sma3 = by[("sma", 20.0, 2)], by[("sma", 20.0, 3)]
    assert sma2["iterations"] == [10, 30] and sma3["iterations"] == [10, 20, 30]
    s10 = 2 * sma2["loss"] - s30
    s20 = 3 * sma3["loss"] - s10 - s30
    cos3 = by[("wsm:cosine", 20.0, 3)]
    assert cos3["weights"] == pytest.approx(schedules.wsm(3, "cosine"))
    assert cos3["loss"] == pytest.approx(sum(c * s for c, s in zip(cos3["weights"], (s10, s20, s30))), rel=1e-4)
    fail = by[("wsm:cosine", 20.0, 2)]
    assert fail["loss"] is None and "exited with 1" in fail["error"] and "on purpose" in fail["error"]
    for n in (2, 3):  # a 40-iteration window needs checkpoints 40 apart: the run spans 20
        assert by[("sma", 40.0, n)]["loss"] is None and "does not fit" in by[("sma", 40.0, n)]["error"]
    assert (out / "sweep.png").stat().st_size > 5_000
    assert list(scratch.iterdir()) == []
    assert "best:" in p.stdout and "kept the best merge" in p.stdout
    assert (best / "metadata.json").is_file()
    assert (best.parent / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    assert res["best"]["loss"] == min(t["loss"] for t in res["trials"] if t["loss"] is not None)


@pytest.mark.parametrize("args, message", [
    (["--num-models", "1"], "at least 2 checkpoints"),
    (["--methods", "sma,foo"], "unknown merge method 'foo'"),
    (["--methods", "wsm:exp"], "unknown decay 'exp'"),
    (["--windows", "0"], "positive length"),
    (["--eval-cmd", "python eval.py"], "{ckpt}"),
    (["--save-dir", "/nonexistent/save"], "/nonexistent/save: no such save directory"),
])
def test_sweep_bad_input_exit_2_nothing_written(gpt_tp2, tmp_path, args, message):
    base = {"--save-dir": str(gpt_tp2[0].parent), "--windows": "20", "--eval-cmd": "python e.py {ckpt}",
            "--out": str(tmp_path / "out")}
    argv = ["sweep"]
    for k, v in base.items():
        if k not in args:
            argv += [k, v]
    p = cli(*argv, *args)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_merge_wsm_decay_real_checkpoints(gpt_tp2, tmp_path):
    out = tmp_path / "merged"
    p = cli("merge", *gpt_tp2, "-o", out, "--method", "wsm", "--decay", "minus-sqrt")
    assert p.returncode == 0, p.stderr
    meta = json.loads((out / "pma_provenance.json").read_text())
    expected = schedules.wsm(3, "minus-sqrt")
    printed = [float(x.split(":")[1]) for x in p.stdout.split("weight ")[1].split(")")[0].split(", ")]
    assert printed == pytest.approx(expected, rel=1e-3)
    assert _embedding_mean(out) == pytest.approx(sum(c * _embedding_mean(d) for c, d in zip(expected, gpt_tp2)),
                                                 rel=1e-5)
    assert meta["method"] == "wsm:minus-sqrt"
    assert [i["weight"] for i in meta["inputs"]] == pytest.approx(expected)
    p = cli("merge", *gpt_tp2, "-o", tmp_path / "m2", "--method", "sma", "--decay", "cosine")
    assert p.returncode == 2 and "--decay only applies to --method wsm" in p.stderr
    assert not (tmp_path / "m2").exists()


def test_sweep_nemo2_checkpoints_dir_and_keep_best(ckpt_cache_root, tmp_path):
    """A NeMo 2 ``checkpoints/`` dir (names are not iter_XXXXXXX): windows by step, best re-merged."""
    import ckpt_factory
    import nemo2_factory

    run = nemo2_factory.cached_nemo_run("nemo2-tp2")

    def score(path):
        sd = ckpt_factory.load_full_tensors(Path(path) / "weights")
        return next(v for k, v in sd.items() if "word_embeddings" in k).double().mean().item()

    res = sw.sweep(run, score, windows=[20], num_models=[3], methods=["sma"])
    [t] = res.trials
    assert t.iterations == [10, 20, 30] and t.error is None, t.error
    assert res.last.iterations == [30]
    inputs = [score(p) for p in t.inputs]
    assert t.loss == pytest.approx(sum(inputs) / 3, rel=1e-6)
    out = sw.publish_best(res, tmp_path / "best-step30")
    assert (out.output / "weights" / "metadata.json").is_file()
    assert score(out.output) == pytest.approx(t.loss, rel=1e-9)
