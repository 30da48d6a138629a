"""NeMo-Aligner adapter: the actor loss, and the patch against the nemo-aligner 0.7.0 sdist.

NeMo-Aligner cannot run here (needs nemo-toolkit <= 2.4.1 and CUDA).  The reference below is an
independent re-derivation of ``MegatronGPTActorModel.get_actor_forward_output_and_loss_func``'s
``loss_func`` in nemo-aligner 0.7.0:

    is_end_mask = mask * is_end[:, None]
    r = exp(curr - prev); rc = clamp(r, 1 - ratio_eps, 1 + ratio_eps)
    loss = mean over is_end_mask of max(-A r, -A rc) - scaled_entropy   (if any valid token)
         = 0 * (-A r)[0, 0]                                             (otherwise)
    ppo_ratio = mean of r over mask; ppo_ratio_clamped = mean of rc over mask
"""

import ast
import os
import py_compile
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from megatron_pma.rl.core import lopti_masks, reweight_advantages
from megatron_pma.rl.nemo_aligner import STAGE_MASK_KEY, aligner_actor_loss, lopti_stage_rollout_data

PATCH = Path(__file__).resolve().parents[2] / "patches" / "nemo-aligner" / "0001-lopti-ar-actor-loss.patch"
PATCHED_FILES = ["nemo_aligner/algorithms/ppo.py", "nemo_aligner/models/nlp/gpt/megatron_gpt_ppo_actor.py"]


def _batch(seed=0, b=5, s=8):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (b, s), generator=g)
    prev = -torch.rand(b, s - 1, generator=g, dtype=torch.float64) * 3
    curr = prev + 0.3 * torch.randn(b, s - 1, generator=g, dtype=torch.float64)
    mask = torch.ones(b, s - 1, dtype=torch.float64)
    mask[:, :2] = 0  # prompt
    mask[1, 6:] = 0
    is_end = torch.tensor([1, 1, 0, 1, 1], dtype=torch.float64)
    adv = torch.randn(b, s - 1, generator=g, dtype=torch.float64)
    return curr, dict(response_tokens=tokens, advantages=adv, mask=mask, prev_logprobs=prev, is_end=is_end)


def _reference(curr, batch, eps, scaled_entropy):
    b, t = curr.shape
    vals, rs, rcs = [], [], []
    for i in range(b):
        for j in range(t):
            r = float((curr[i, j] - batch["prev_logprobs"][i, j]).exp())
            rc = min(max(r, 1 - eps), 1 + eps)
            a = float(batch["advantages"][i, j])
            if batch["mask"][i, j]:
                rs.append(r)
                rcs.append(rc)
                if batch["is_end"][i]:
                    vals.append(max(-a * r, -a * rc))
    loss = (sum(vals) / len(vals) - scaled_entropy) if vals else 0.0
    return loss, sum(rs) / len(rs), sum(rcs) / len(rcs)


@pytest.mark.parametrize("ent", [0.0, 0.01])
def test_matches_nemo_aligner_loss_when_off(ent):
    curr, batch = _batch()
    loss, r, rc = aligner_actor_loss(curr, batch, 0.2, scaled_entropy=torch.tensor(ent, dtype=torch.float64))
    e_loss, e_r, e_rc = _reference(curr, batch, 0.2, ent)
    assert loss.item() == pytest.approx(e_loss, rel=1e-12)
    assert r.item() == pytest.approx(e_r, rel=1e-12) and rc.item() == pytest.approx(e_rc, rel=1e-12)


def test_no_valid_token_gives_zero_loss_with_graph():
    curr, batch = _batch()
    curr.requires_grad_(True)
    batch["is_end"] = torch.zeros(5, dtype=torch.float64)
    loss, _, _ = aligner_actor_loss(curr, batch, 0.2)
    assert loss.item() == 0.0 and loss.requires_grad


def test_ar_and_stage_mask():
    curr, batch = _batch(seed=1)
    ar, _, _ = aligner_actor_loss(curr, batch, 0.2, alpha=0.3)
    manual, _, _ = aligner_actor_loss(curr, dict(batch, advantages=reweight_advantages(batch["advantages"], batch["prev_logprobs"], 0.3)), 0.2)
    torch.testing.assert_close(ar, manual)
    stages = lopti_stage_rollout_data(batch, 0.3)
    assert [n for n, _ in stages] == ["low", "high"]
    low, high = lopti_masks(batch["prev_logprobs"], batch["mask"], 0.3)
    assert torch.equal(stages[0][1][STAGE_MASK_KEY].bool(), low)
    assert stages[0][1]["mask"] is batch["mask"] and STAGE_MASK_KEY not in batch
    parts = [aligner_actor_loss(curr, d, 0.2, alpha=0.3)[0] for _, d in stages]
    torch.testing.assert_close(parts[0] + parts[1], ar)  # normaliser unchanged
    assert lopti_stage_rollout_data(batch, None)[0][0] is None
    assert [n for n, _ in lopti_stage_rollout_data(batch, 0.3, low_first=False)] == ["high", "low"]


# ------------------------------------------------------------------------------------------ patch


@pytest.fixture(scope="module")
def sdist_root(tmp_path_factory):
    """The unpacked nemo-aligner 0.7.0 sdist: $NEMO_ALIGNER_SDIST (a .tar.gz) or `pip download`."""
    d = tmp_path_factory.mktemp("nemo_aligner_sdist")
    local = os.environ.get("NEMO_ALIGNER_SDIST")
    if local:
        tgz = Path(local)
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "nemo-aligner==0.7.0", "-d", str(d)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot download the nemo-aligner 0.7.0 sdist with pip: {exc}")
        found = list(d.glob("nemo_aligner-0.7.0.tar.gz"))
        if proc.returncode != 0 or not found:
            pytest.skip(f"cannot download the nemo-aligner 0.7.0 sdist with pip: {proc.stderr.strip()[-300:]}")
        tgz = found[0]
    with tarfile.open(tgz) as tf:
        tf.extractall(d / "src", filter="data")
    return d / "src" / "nemo_aligner-0.7.0"


@pytest.mark.slow  # downloads the sdist with pip (set NEMO_ALIGNER_SDIST=/path/to/nemo_aligner-0.7.0.tar.gz to skip that)
def test_patch_applies_and_compiles(sdist_root, tmp_path):
    if shutil.which("patch") is None:
        pytest.skip("the `patch` program is not installed")
    work = tmp_path / "nemo_aligner-0.7.0"
    shutil.copytree(sdist_root, work)
    originals = {f: (work / f).read_text() for f in PATCHED_FILES}
    for args in (["--dry-run"], []):
        proc = subprocess.run(["patch", "-p1", "--forward", *args, "-i", str(PATCH)], cwd=work, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "FAILED" not in proc.stdout and "offset" not in proc.stdout.lower()
    for f in PATCHED_FILES:
        text = (work / f).read_text()
        assert text != originals[f]
        py_compile.compile(str(work / f), doraise=True)
        # every name the patch imports from megatron_pma exists there
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_pma"):
                mod = __import__(node.module, fromlist=["x"])
                for alias in node.names:
                    assert hasattr(mod, alias.name), (node.module, alias.name)
    actor = (work / PATCHED_FILES[1]).read_text()
    assert "aligner_actor_loss(" in actor and "torch.max(loss1, loss2)" not in actor
    assert "lopti_stage_rollout_data(" in (work / PATCHED_FILES[0]).read_text()
    # the patch does not apply twice
    again = subprocess.run(["patch", "-p1", "--forward", "--dry-run", "-i", str(PATCH)], cwd=work, capture_output=True, text=True)
    assert again.returncode != 0


def test_entropy_bonus_masked_by_stage_normalised_over_full_mask():
    """NeMo-Aligner's entropy bonus is ``masked_mean(entropy, mask) = entropy[mask.bool()].mean()``
    (nemo_aligner/utils/ppo_utils.py calculate_entropy); with our (mask, scale) the stages add up to it."""
    from megatron_pma.rl.nemo_aligner import lopti_entropy_weighting

    curr, batch = _batch(seed=2)
    entropy = torch.rand(batch["mask"].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    is_end_mask = batch["mask"] * batch["is_end"].view(-1, 1)
    bonus = lambda m, s: entropy[m.bool()].mean() * s  # noqa: E731
    m, s = lopti_entropy_weighting(batch, is_end_mask)
    assert m is is_end_mask and s == 1.0
    parts = []
    for _, staged in lopti_stage_rollout_data(batch, 0.3):
        m, s = lopti_entropy_weighting(staged, is_end_mask)
        assert torch.equal(m.bool(), (is_end_mask * staged[STAGE_MASK_KEY]).bool())
        parts.append(bonus(m, s))
    torch.testing.assert_close(parts[0] + parts[1], bonus(is_end_mask, 1.0))
    empty = dict(batch, **{STAGE_MASK_KEY: torch.zeros_like(batch["mask"])})
    assert lopti_entropy_weighting(empty, is_end_mask)[1] == 0.0
