"""PNG plots written beside a compressed model: layer scores and the replacement's loss curves."""

from __future__ import annotations

import functools
import sys
from pathlib import Path


@functools.cache
def _plt():
    """pyplot on the Agg backend, or None (and one line on stderr, once) without the `plots` extra."""
    try:
        import matplotlib
    except ImportError:
        print("slimlm: no PNG plots: matplotlib is not installed (pip install 'slimlm[plots]')", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scores(report: dict, path: Path) -> None:
    """Left: S[i, k] heat map. Right: the score each method ranks layers/blocks by, removed ones marked."""
    plt = _plt()
    if plt is None:
        return
    sel = report["selection"]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5))
    im = ax0.imshow(sel["similarity"], cmap="viridis", vmin=min(0.0, min(map(min, sel["similarity"]))), vmax=1)
    ax0.set_title("cos(hidden entering layer i, hidden entering layer k)")
    ax0.set_xlabel("k")
    ax0.set_ylabel("i")
    fig.colorbar(im, ax=ax0, fraction=0.046)
    removed = set(sel["removed_layers"])
    if report["config"]["method"] == "shortgpt":
        bi = sel["block_influence"]
        ax1.bar(range(len(bi)), bi, color=["tab:red" if i in removed else "tab:blue" for i in range(len(bi))])
        ax1.set_title("Block Influence per layer (red: removed)")
        ax1.set_xlabel("layer")
        ax1.set_ylabel("1 - cos(in, out)")
    else:
        sc = sel["block_scores"]
        start = sel["removed_layers"][0]
        lines = ax1.plot(range(len(sc)), sc, marker="o", ms=3, label="cosine (input, output)")
        lines.append(ax1.axvline(start, color="tab:red", ls="--",
                                 label=f"chosen block {start}..{start + len(removed) - 1}"))
        ax1.set_title(f"each {len(removed)}-layer block (chosen by {sel.get('block_choice', 'cosine')})")
        ax1.set_xlabel("first layer of the block")
        ax1.set_ylabel("mean cosine similarity")
        kl = sel.get("block_kl")
        if kl:  # what removing each block costs, on its own (log) axis
            ax2 = ax1.twinx()
            starts = [j for j, v in enumerate(kl) if v is not None and v > 0]
            lines += ax2.plot(starts, [kl[j] for j in starts], marker="s", ms=3, color="tab:orange",
                              label="KL to the full model, block removed")
            ax2.set_yscale("log")
            ax2.set_ylabel("KL (nats per token)")
        ax1.legend(lines, [ln.get_label() for ln in lines], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss(report: dict, path: Path) -> bool:
    """Train/validation loss of every training stage (one panel each); False when none ran or matplotlib is absent."""
    train = report.get("training") or {}
    stages = [  # (key, x field, train field, validation field, y label, title)
        ("mse", "epoch", "train_mse", "val_mse", "MSE vs removed block's output", "replacement (hidden states)"),
        ("kd", "epoch", "train_kd", "val_kd", "cross-entropy vs original model", "distillation"),
        ("lm", "epoch", "train_ce", "val_ce", "next-token cross-entropy", "replacement training (lm loss)"),
        ("recover", "step", "train_kl", "val_kl", "KL to the original model", "whole-model recovery"),
    ]
    stages = [st for st in stages if (train.get(st[0]) or {}).get("history")]
    if not stages:
        return False
    plt = _plt()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 4), squeeze=False)
    for ax, (key, x, tr, va, ylabel, title) in zip(axes[0], stages):
        hist = train[key]["history"]
        ax.plot([h[x] for h in hist[1:]], [h[tr] for h in hist[1:]], marker="o", label="train")
        ax.plot([h[x] for h in hist], [h[va] for h in hist], marker="s", label="validation (held out)")
        if key in ("mse", "recover"):
            ax.set_yscale("log")
        ax.set_xlabel(f"{x} (0 = before training)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
