"""The demo's figures: one PNG per claim, plus the held-out loss curves along the run."""

from __future__ import annotations

from pathlib import Path

from megatron_pma.demo import stats

# one colour and marker per arm, used by every figure
STYLE = {
    "last": ("tab:gray", "o", "last checkpoint"),
    "sma": ("tab:blue", "s", "SMA"),
    "ema": ("tab:green", "^", "EMA"),
    "wma": ("tab:olive", "v", "WMA"),
    "wsm:linear": ("tab:purple", "D", "WSM linear"),
    "wsm:cosine": ("tab:pink", "P", "WSM cosine"),
    "wsm:inv-sqrt": ("tab:brown", "X", "WSM inv-sqrt"),
    "wsm:minus-sqrt": ("tab:cyan", "h", "WSM minus-sqrt"),
    "annealed": ("tab:red", "*", "annealed branch"),
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def val_loss(per_seed: list[dict], arms, path: Path, a) -> None:
    """Held-out loss along the run (checkpoints, hook merges) and every arm's final value; the final
    points are spread around the last iteration so that none hides another."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    T = a.train_iters
    for i, r in enumerate(per_seed):
        c = r["curve"]
        lab = (lambda s: s) if i == 0 else (lambda s: None)
        ax.plot(*zip(*c["last"]), "o-", color=STYLE["last"][0], alpha=0.7, ms=3,
                label=lab("checkpoints along the run"))
        ax.plot(*zip(*c["pma_sma"]), "s-", color=STYLE["sma"][0], alpha=0.7, ms=3,
                label=lab(f"PMA hook merges (SMA, N={a.num_models})"))
        for j, m in enumerate(arms):
            color, marker, name = STYLE[m]
            x = T + (j - (len(arms) - 1) / 2) * T * 0.012
            ax.plot([x], [r["val_loss"][m]], marker, color=color, ms=9 if m == "annealed" else 7,
                    markeredgecolor="black", markeredgewidth=0.5, linestyle="none", label=lab(f"final: {name}"))
    finals = [r["val_loss"][m] for r in per_seed for m in arms]
    later = [l for r in per_seed for _, l in r["curve"]["last"][len(r["curve"]["last"]) // 3:]]
    lo, hi = min(finals), max(later + finals)
    pad = 0.08 * (hi - lo) + 1e-3
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlim(left=T * 0.3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title(f"Tiny Megatron-Core GPT, constant LR {a.lr:g}, {len(per_seed)} seed(s); final arms at iteration {T}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pma_bars(section: dict, path: Path) -> None:
    """Change of held-out loss vs the last checkpoint, mean +- SE over seeds, per arm."""
    plt = _plt()
    arms = [m for m in section["vs_last"]]
    means = [section["vs_last"][m]["mean"] for m in arms]
    ses = [section["vs_last"][m]["se"] or 0.0 for m in arms]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.bar(range(len(arms)), means, yerr=ses, capsize=3, color=[STYLE[m][0] for m in arms])
    ax.set_xticks(range(len(arms)), [STYLE[m][2] for m in arms], rotation=30, ha="right", fontsize=8)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("held-out loss - last (nats/byte)")
    ax.set_title("PMA: merged (same window) and annealed vs the last constant-LR checkpoint; bars = paired SE",
                 fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def lawa(section: dict, path: Path) -> None:
    plt = _plt()
    rows = section["by_lr"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    lrs = [r["lr"] for r in rows]
    ax.errorbar(lrs, [r["gain"]["mean"] for r in rows], yerr=[r["gain"]["se"] or 0.0 for r in rows],
                fmt="o-", capsize=4, color=STYLE["sma"][0], label="LAWA gain (last - merged)")
    for r in rows:
        for g in r["gain"]["per_seed"]:
            ax.plot([r["lr"]], [g], ".", color="gray", alpha=0.7)
    ax.set_xscale("log")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("constant learning rate")
    ax.set_ylabel("held-out loss gain (nats/byte)")
    ax.set_title("LAWA: gain of merging over the last checkpoint vs LR", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pma_init(per_seed: list[dict], path: Path, k: int = 10) -> None:
    """Training loss and GradNorm per step (mean over seeds, trailing mean over k steps)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for arm, color in (("last", STYLE["last"][0]), ("merged", STYLE["sma"][0])):
        for ax, key in zip(axes, ("loss", "grad_norm")):
            series = [r[arm][key] for r in per_seed]
            mean = [sum(v) / len(v) for v in zip(*series)]
            ax.plot(range(1, len(mean) + 1), mean, color=color, alpha=0.25, lw=0.8)
            ax.plot(range(1, len(mean) + 1), stats.smooth(mean, k), color=color, lw=1.6,
                    label=f"from {'the PMA merge' if arm == 'merged' else 'the last checkpoint'}")
    axes[0].set_ylabel("training loss (nats/byte)")
    axes[1].set_ylabel("GradNorm (before clipping)")
    for ax in axes:
        ax.set_xlabel("continued-training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"PMA-init: continue training (fresh optimizer, same data and LR), {len(per_seed)} seed(s)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
