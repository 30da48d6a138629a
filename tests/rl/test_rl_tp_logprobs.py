"""Vocab-parallel (TP=2) taken-token log-probs under a real gloo process group equal TP=1,
values and gradients, also through the full clipped policy loss with AR and a Lopti stage mask."""

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_pma.rl.core import clipped_policy_loss, lopti_masks, taken_token_logprobs
from megatron_pma.rl.nemo_rl import LoptiClippedPGLossFn

WORLD = 2
B, T, V = 3, 5, 14  # V_local = 7


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs():
    g = torch.Generator().manual_seed(1234)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    tokens = torch.randint(0, V, (B, T), generator=g)
    # make sure both shards own some targets
    tokens[0, 0], tokens[0, 1] = 0, V - 1
    old = torch.log_softmax(logits + 0.2 * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    old = old.gather(-1, tokens[..., None]).squeeze(-1)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 3:] = 0
    return logits, tokens, old, adv, mask


def _loss(logits, tokens, old, adv, mask, group=None, stage=None):
    lp = taken_token_logprobs(logits, tokens, group)
    loss, _ = clipped_policy_loss(lp, old, adv, mask, alpha=0.3, stage_mask=stage, eps_low=0.2, eps_high=0.24)
    return lp, loss


_NRL_CFG = dict(ratio_clip_min=0.2, ratio_clip_max=0.24, ratio_clip_c=3.0, reference_policy_kl_penalty=0.01,
                token_level_loss=True, advantage_reweight_alpha=0.3)


def _nrl_data():
    """NeMo-RL-style data for the same logits: input_ids [B, T+1] so that logits[:, t] predict ids[:, t+1]."""
    logits, tokens, old, adv, mask = _inputs()
    pad = torch.zeros(B, 1, dtype=torch.float64)
    return dict(
        input_ids=torch.cat([torch.zeros(B, 1, dtype=torch.long), tokens], 1),
        advantages=torch.cat([pad, adv[:, None].expand(B, T)], 1),
        prev_logprobs=torch.cat([pad, old], 1),
        generation_logprobs=torch.cat([pad, old], 1),
        reference_policy_logprobs=torch.cat([pad, old + 0.1], 1),
        token_mask=torch.cat([pad, mask], 1),
        sample_mask=torch.ones(B, dtype=torch.float64),
    )


def _worker(rank, port, outdir, scratch):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        logits, tokens, old, adv, mask = _inputs()
        vl = V // WORLD
        shard = logits[..., rank * vl : (rank + 1) * vl].clone().requires_grad_()
        stage, _ = lopti_masks(old, mask, 0.5)
        lp = taken_token_logprobs(shard, tokens, dist.group.WORLD, scratch_bytes=scratch)
        lp_chunked = taken_token_logprobs(shard, tokens, dist.group.WORLD, scratch_bytes=8 * 7 * 2)
        g_chunked = torch.autograd.grad(lp_chunked.sum(), shard)[0]
        lp_grad = torch.autograd.grad(lp.sum(), shard)[0]
        _, loss = _loss(shard, tokens, old, adv, mask, dist.group.WORLD, stage)
        loss_grad = torch.autograd.grad(loss, shard)[0]
        # the NeMo-RL adapter's v0.5 vocab-parallel path on the same shard
        nrl_loss, _ = LoptiClippedPGLossFn(_NRL_CFG)(
            shard, _nrl_data(), torch.tensor(3.0), torch.tensor(11.0),
            vocab_parallel_rank=rank, vocab_parallel_group=dist.group.WORLD,
        )
        nrl_grad = torch.autograd.grad(nrl_loss, shard)[0]
        torch.save(
            {"lp": lp.detach(), "lp_grad": lp_grad, "lp_chunked": lp_chunked.detach(), "g_chunked": g_chunked, "loss": loss.detach(), "loss_grad": loss_grad,
             "nrl_loss": nrl_loss.detach(), "nrl_grad": nrl_grad},
            os.path.join(outdir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _run(scratch):
    with tempfile.TemporaryDirectory() as d:
        # fork: the children inherit the imported torch instead of re-importing it (much faster start)
        mp.start_processes(_worker, args=(_free_port(), d, scratch), nprocs=WORLD, join=True, start_method="fork")
        res = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(WORLD)]

    logits, tokens, old, adv, mask = _inputs()
    full = logits.clone().requires_grad_()
    ref_lp = torch.log_softmax(full, -1).gather(-1, tokens[..., None]).squeeze(-1)
    ref_lp_grad = torch.autograd.grad(ref_lp.sum(), full)[0]
    stage, _ = lopti_masks(old, mask, 0.5)
    _, ref_loss = _loss(full, tokens, old, adv, mask, None, stage)
    ref_loss_grad = torch.autograd.grad(ref_loss, full)[0]
    # TP=1 through our own function as well
    lp1 = taken_token_logprobs(logits, tokens)
    torch.testing.assert_close(lp1, ref_lp.detach())

    vl = V // WORLD
    for r in range(WORLD):
        torch.testing.assert_close(res[r]["lp"], ref_lp.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res[r]["loss"], ref_loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res[r]["lp_grad"], ref_lp_grad[..., r * vl : (r + 1) * vl], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res[r]["lp_chunked"], ref_lp.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res[r]["g_chunked"], ref_lp_grad[..., r * vl : (r + 1) * vl], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            res[r]["loss_grad"], ref_loss_grad[..., r * vl : (r + 1) * vl], rtol=1e-12, atol=1e-12
        )
    # NeMo-RL adapter, TP=2 vs TP=1 (its logits are [B, T+1, V]: append a dummy last position)
    full_nrl = torch.cat([logits, torch.zeros(B, 1, V, dtype=logits.dtype)], 1).requires_grad_()
    nrl_ref, _ = LoptiClippedPGLossFn(_NRL_CFG)(full_nrl, _nrl_data(), torch.tensor(3.0), torch.tensor(11.0))
    nrl_ref_grad = torch.autograd.grad(nrl_ref, full_nrl)[0][:, :T]
    for r in range(WORLD):
        torch.testing.assert_close(res[r]["nrl_loss"], nrl_ref.detach().to(res[r]["nrl_loss"].dtype), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(
            res[r]["nrl_grad"][:, :T], nrl_ref_grad[..., r * vl : (r + 1) * vl].to(res[r]["nrl_grad"].dtype), rtol=1e-5, atol=1e-7
        )
    # the assembled shards are the full gradient
    torch.testing.assert_close(torch.cat([x["loss_grad"] for x in res], -1), ref_loss_grad)
    assert ref_loss_grad.abs().sum() > 0


def test_tp2_equals_tp1_gloo():
    """One spawn of 2 gloo ranks (process start-up dominates the cost); inside, the chunked local
    log-sum-exp path is checked as well (scratch of 2 rows)."""
    _run(scratch=1 << 25)
