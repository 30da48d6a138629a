"""Vocab-parallel (TP=2) taken-token log-probs under a real gloo process group equal TP=1,
values and gradients, also through the framework-free clipped policy loss with AR and a Lopti stage mask
(the core verl and NeMo-Aligner use; NeMo-RL computes its own log-probs, which our adapter wraps)."""

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_pma.rl.core import clipped_policy_loss, lopti_masks, taken_token_logprobs

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
        torch.save(
            {"lp": lp.detach(), "lp_grad": lp_grad, "lp_chunked": lp_chunked.detach(), "g_chunked": g_chunked, "loss": loss.detach(), "loss_grad": loss_grad},
            os.path.join(outdir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _run(scratch):
    with tempfile.TemporaryDirectory() as d:
        # spawn, not fork: a fork inherits whatever threads earlier tests' imports started (NeMo-RL's
        # third-party stack does), and gloo can then deadlock in the child
        mp.start_processes(_worker, args=(_free_port(), d, scratch), nprocs=WORLD, join=True, start_method="spawn")
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
    # the assembled shards are the full gradient
    torch.testing.assert_close(torch.cat([x["loss_grad"] for x in res], -1), ref_loss_grad)
    assert ref_loss_grad.abs().sum() > 0


def test_tp2_equals_tp1_gloo():
    """One spawn of 2 gloo ranks (process start-up dominates the cost); inside, the chunked local
    log-sum-exp path is checked as well (scratch of 2 rows)."""
    _run(scratch=1 << 25)
