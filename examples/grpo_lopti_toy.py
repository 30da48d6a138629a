#!/usr/bin/env python
"""Toy reproduction of AR and Lopti (Yang et al., arXiv:2505.12929) on CPU in a few minutes.

A tiny GPT (plain torch) is first trained by SFT to a modest pass rate on a verifiable task (two-digit
addition, ``"27+58=" -> "085"``), then trained with GRPO under four variants, same rollout budget:

    grpo        GRPO (token-mean, clip 0.20/0.24, k3 KL 0.001 to the SFT model)
    grpo+ar     + Advantage Reweighting (alpha)
    grpo+lopti  + Low-Probability Token Isolation (eta; two update stages per rollout batch)
    grpo+both   both

for several seeds (the SFT model of a seed is shared by its four variants).  Prints a table, writes
``reward_curves.png`` and ``results.json`` to ``--out``.

    python examples/grpo_lopti_toy.py --quick            # 3 seeds x 4 variants x 30 steps: a few minutes
    python examples/grpo_lopti_toy.py                    # 5 seeds x 60 steps (~10-15 min on 2 cores)
    python examples/grpo_lopti_toy.py --digits 3 --extra-vocab 64 --sft-target 0.15
        # harder: 3-digit operands (4-token answers), 77-token vocabulary, lower starting pass rate

All the RL pieces come from ``megatron_pma.rl`` (``clipped_policy_loss``, ``taken_token_logprobs``,
``run_lopti_stages``, ``LoptiConfig``).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_pma.rl import LoptiConfig, clipped_policy_loss, run_lopti_stages, taken_token_logprobs  # noqa: E402

# ----------------------------------------------------------------------------------------- task
DIGITS = "0123456789"


class Task(NamedTuple):
    """``a + b`` with ``digits``-digit operands, the answer zero-padded to ``digits + 1`` tokens.
    ``extra_vocab`` appends tokens that never occur in the data: a larger vocabulary, so sampling can
    land on (and the update be dominated by) low-probability tokens."""

    digits: int = 2
    extra_vocab: int = 0

    @property
    def vocab(self) -> list[str]:
        return list(DIGITS) + ["+", "=", "<bos>"] + [f"<x{i}>" for i in range(self.extra_vocab)]

    @property
    def stoi(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.vocab)}

    @property
    def prompt_len(self) -> int:  # <bos> a.. + b.. =
        return 2 * self.digits + 3

    @property
    def resp_len(self) -> int:
        return self.digits + 1

    def encode_prompt(self, a: int, b: int) -> list[int]:
        stoi, d = self.stoi, self.digits
        return [stoi["<bos>"]] + [stoi[c] for c in f"{a:0{d}d}+{b:0{d}d}="]

    def answer_tokens(self, a: int, b: int) -> list[int]:
        return [self.stoi[c] for c in f"{a + b:0{self.resp_len}d}"]

    def shuffled_pairs(self, limit: int = 40_000) -> list[tuple[int, int]]:
        """Every operand pair shuffled (2 digits: all 10 000), or ``limit`` distinct ones (more digits)."""
        n = 10**self.digits
        rng = random.Random(1234)
        if n * n <= limit:
            pairs = [(a, b) for a in range(n) for b in range(n)]
            rng.shuffle(pairs)
            return pairs
        return [(i // n, i % n) for i in rng.sample(range(n * n), limit)]


DEFAULT_TASK = Task()
VOCAB = DEFAULT_TASK.vocab
encode_prompt = DEFAULT_TASK.encode_prompt
answer_tokens = DEFAULT_TASK.answer_tokens


# ---------------------------------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, task: Task = DEFAULT_TASK, d=64, n_layer=2, n_head=4):
        super().__init__()
        vocab, ctx = len(task.vocab), task.prompt_len + task.resp_len
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList([Block(d, n_head) for _ in range(n_layer)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


# ------------------------------------------------------------------------------------ utilities
def batch_prompts(task, pairs):
    return torch.tensor([task.encode_prompt(a, b) for a, b in pairs])


def batch_answers(task, pairs):
    return torch.tensor([task.answer_tokens(a, b) for a, b in pairs])


@torch.no_grad()
def generate(model, task, prompts, *, greedy=False, temperature=1.0, gen=None):
    seq = prompts
    for _ in range(task.resp_len):
        logits = model(seq)[:, -1].float()
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    return seq


def response_logprobs(model, task, seq, temperature=1.0):
    """Log-probs of the response tokens (positions prompt_len..end) under ``model``: [B, resp_len]."""
    logits = model(seq[:, :-1])[:, task.prompt_len - 1 :] / temperature
    return taken_token_logprobs(logits, seq[:, task.prompt_len :])


@torch.no_grad()
def pass_rate(model, task, pairs, bs=500):
    ok = 0
    for i in range(0, len(pairs), bs):
        chunk = pairs[i : i + bs]
        out = generate(model, task, batch_prompts(task, chunk), greedy=True)
        ok += (out[:, task.prompt_len :] == batch_answers(task, chunk)).all(-1).sum().item()
    return ok / len(pairs)


# ------------------------------------------------------------------------------------------ SFT
def sft(model, task, pairs, steps, bs=128, lr=3e-3, seed=0):
    g = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        chunk = [pairs[g.randrange(len(pairs))] for _ in range(bs)]
        seq = torch.cat([batch_prompts(task, chunk), batch_answers(task, chunk)], 1)
        logits = model(seq[:, :-1])[:, task.prompt_len - 1 :]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, task.prompt_len :].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


# ----------------------------------------------------------------------------------------- GRPO
def grpo_run(init_model, task, train_pairs, test_pairs, cfg: LoptiConfig, args, seed):
    """One GRPO run; returns per-step train reward and periodic greedy test pass rates."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    model = copy.deepcopy(init_model)
    ref = copy.deepcopy(init_model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g_size, n_prompts = args.group_size, args.prompts_per_step
    curve = {"step": [], "train_reward": [], "eval_step": [], "test_pass": [], "low_frac": []}
    updates = 0
    t0 = time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            curve["eval_step"].append(step)
            curve["test_pass"].append(pass_rate(model, task, test_pairs))
        if step == args.steps:
            break
        pairs = [train_pairs[rng.randrange(len(train_pairs))] for _ in range(n_prompts)]
        prompts = batch_prompts(task, pairs).repeat_interleave(g_size, 0)
        answers = batch_answers(task, pairs).repeat_interleave(g_size, 0)
        seq = generate(model, task, prompts, temperature=args.temperature, gen=gen)
        reward = (seq[:, task.prompt_len :] == answers).all(-1).float()
        r = reward.view(n_prompts, g_size)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1)
        with torch.no_grad():
            old = response_logprobs(model, task, seq, args.temperature)
            ref_lp = response_logprobs(ref, task, seq, args.temperature)
        mask = torch.ones_like(old)
        curve["step"].append(step)
        curve["train_reward"].append(reward.mean().item())
        if cfg.eta is not None:
            curve["low_frac"].append(((old.exp() < cfg.eta).float().mean()).item())

        def update(stage_mask, _name):
            nonlocal updates
            n = seq.shape[0]
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, args.minibatch):
                idx = perm[i : i + args.minibatch]
                lp = response_logprobs(model, task, seq[idx], args.temperature)
                loss, _ = clipped_policy_loss(
                    lp,
                    old[idx],
                    adv[idx],
                    mask[idx],
                    eps_low=cfg.eps_low,
                    eps_high=cfg.eps_high,
                    ref_logprobs=ref_lp[idx],
                    kl_coef=cfg.kl_coef,
                    token_level=cfg.token_level,
                    stage_mask=None if stage_mask is None else stage_mask[idx],
                    alpha=cfg.alpha,
                )
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                updates += 1

        run_lopti_stages(update, old, mask, cfg.eta, low_first=cfg.low_first)
    curve["optimizer_steps"] = updates
    curve["seconds"] = time.time() - t0
    return curve


VARIANTS = {
    "grpo": dict(),
    "grpo+ar": dict(alpha="alpha"),
    "grpo+lopti": dict(eta="eta"),
    "grpo+both": dict(alpha="alpha", eta="eta"),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small budget (3 seeds, few steps): a few minutes on 2 cores")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="GRPO rollout steps per run")
    ap.add_argument("--sft-steps", type=int, default=None, help="SFT step cap (default 600)")
    ap.add_argument("--sft-target", type=float, default=0.4, help="stop SFT once the validation pass rate reaches this")
    ap.add_argument("--sft-chunk", type=int, default=25, help="SFT steps between validation checks")
    ap.add_argument("--sft-pairs", type=int, default=1500, help="SFT data size (kept small for a modest pass rate)")
    ap.add_argument("--prompts-per-step", type=int, default=None, help="default 16")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--minibatch", type=int, default=None, help="default: half the rollout batch")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--eta", type=float, default=0.5)
    ap.add_argument("--kl-coef", type=float, default=0.001)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--test-size", type=int, default=None, help="default 500 (300 with --quick)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a small shared CPU)")
    ap.add_argument("--digits", type=int, default=2, help="operand digits (answers have digits + 1 tokens)")
    ap.add_argument("--extra-vocab", type=int, default=0, help="vocabulary tokens that never occur in the data")
    ap.add_argument("--out", default="toy_lopti_out")
    args = ap.parse_args(argv)
    q = args.quick
    args.seeds = args.seeds or (3 if q else 5)
    args.steps = args.steps or (30 if q else 60)
    args.sft_steps = args.sft_steps or 600
    args.eval_every = args.eval_every or (10 if q else 15)
    args.prompts_per_step = args.prompts_per_step or 16
    args.minibatch = args.minibatch or args.prompts_per_step * args.group_size // 2  # 2 optimizer steps per stage
    args.test_size = args.test_size or (300 if q else 500)
    torch.set_num_threads(args.threads)

    task = Task(args.digits, args.extra_vocab)
    pairs = task.shuffled_pairs()
    test_pairs = pairs[: args.test_size]
    val_pairs = pairs[args.test_size : args.test_size + 200]
    train_pairs = pairs[args.test_size + 200 :]
    sft_pairs = train_pairs[: args.sft_pairs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    variants = [v for v in args.variants.split(",") if v]
    results = {v: [] for v in variants}
    base_cfg = LoptiConfig(eps_low=0.2, eps_high=0.24, kl_coef=args.kl_coef, token_level=True)
    t_start = time.time()
    sft_rates = []
    for seed in range(args.seeds):
        torch.manual_seed(1000 + seed)
        model = TinyGPT(task)
        # SFT in chunks until the pass rate on a validation split (not the test set) reaches the target:
        # a fixed step count lands anywhere between 10% and 90% (addition is learnt abruptly).
        done = 0
        while True:
            n = min(args.sft_chunk, args.sft_steps - done)
            sft(model, task, sft_pairs, n, seed=seed * 7919 + done)
            done += n
            val_rate = pass_rate(model, task, val_pairs)
            if val_rate >= args.sft_target or done >= args.sft_steps:
                break
        rate = pass_rate(model, task, test_pairs)
        sft_rates.append(rate)
        print(
            f"[seed {seed}] SFT {done} steps: val pass {val_rate:.3f}, test pass {rate:.3f}  ({time.time() - t_start:.0f}s)",
            flush=True,
        )
        for v in variants:
            kw = {k: getattr(args, val) for k, val in VARIANTS[v].items()}
            cfg = base_cfg.replace(**kw)
            curve = grpo_run(model, task, train_pairs, test_pairs, cfg, args, seed=10_000 + seed)
            results[v].append(curve)
            print(
                f"[seed {seed}] {v:11s} test pass {curve['test_pass'][0]:.3f} -> {curve['test_pass'][-1]:.3f}  "
                f"mean train reward {statistics.mean(curve['train_reward']):.3f}  "
                f"optimizer steps {curve['optimizer_steps']}  {curve['seconds']:.0f}s",
                flush=True,
            )

    # ---------------------------------------------------------------- summary
    def mstd(xs):
        return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)

    rows = []
    for v in variants:
        finals = [c["test_pass"][-1] for c in results[v]]
        aucs = [statistics.mean(c["test_pass"][1:]) for c in results[v]]
        trains = [statistics.mean(c["train_reward"][-max(1, len(c["train_reward"]) // 4) :]) for c in results[v]]
        fm, fs = mstd(finals)
        gains = [c["test_pass"][-1] - c["test_pass"][0] for c in results[v]]
        paired = (
            [a - b for a, b in zip(finals, [c["test_pass"][-1] for c in results["grpo"]])] if "grpo" in results else []
        )
        wins = sum(d > 0 for d in paired)
        rows.append(
            dict(
                variant=v,
                final_test_pass_mean=fm,
                final_test_pass_std=fs,
                mean_test_pass_over_training=mstd(aucs)[0],
                late_train_reward=mstd(trains)[0],
                optimizer_steps=results[v][0]["optimizer_steps"],
                per_seed_final=finals,
                gain_over_sft_mean=mstd(gains)[0],
                paired_diff_vs_grpo_mean=mstd(paired)[0] if paired else float("nan"),
                paired_diff_vs_grpo_std=mstd(paired)[1] if paired else float("nan"),
                seeds_better_than_grpo=wins,
            )
        )
    print()
    print(f"SFT test pass rate (mean over {args.seeds} seeds): {statistics.mean(sft_rates):.3f}")
    print(
        f"{'variant':12s} {'final pass':>15s} {'gain vs SFT':>11s} {'paired diff vs grpo':>22s} {'wins':>5s} "
        f"{'mean pass':>9s} {'late reward':>11s} {'opt steps':>9s}"
    )
    for r in rows:
        print(
            f"{r['variant']:12s} {r['final_test_pass_mean']:.3f} +- {r['final_test_pass_std']:.3f} "
            f"{r['gain_over_sft_mean']:+11.3f} {r['paired_diff_vs_grpo_mean']:+13.3f} +- {r['paired_diff_vs_grpo_std']:.3f} "
            f"{r['seeds_better_than_grpo']:>2d}/{len(r['per_seed_final'])} {r['mean_test_pass_over_training']:9.3f} "
            f"{r['late_train_reward']:11.3f} {r['optimizer_steps']:9d}"
        )
    print("(paired diff: final test pass minus GRPO's on the same seed and SFT model; wins: seeds where it is > 0)")

    summary = dict(args=vars(args), sft_test_pass=sft_rates, rows=rows, curves=results, seconds=time.time() - t_start)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    _plot(results, out / "reward_curves.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'reward_curves.png'} ({time.time() - t_start:.0f}s total)")
    return summary


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for v, curves in results.items():
        steps = curves[0]["eval_step"]
        test = torch.tensor([c["test_pass"] for c in curves])
        axes[0].plot(steps, test.mean(0).numpy(), marker="o", label=v)
        axes[0].fill_between(steps, (test.mean(0) - test.std(0, correction=0)).numpy(), (test.mean(0) + test.std(0, correction=0)).numpy(), alpha=0.15)
        tr = torch.tensor([c["train_reward"] for c in curves]).mean(0)
        k = max(1, len(tr) // 15)
        smooth = torch.nn.functional.avg_pool1d(tr[None, None], k, stride=1).squeeze() if k > 1 else tr
        axes[1].plot(range(len(smooth)), smooth.numpy(), label=v)
    axes[0].set_title("greedy test pass rate (mean +- std over seeds)")
    axes[0].set_xlabel("GRPO rollout step")
    axes[1].set_title("train reward (sampled, smoothed)")
    axes[1].set_xlabel("GRPO rollout step")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
