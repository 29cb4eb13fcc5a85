"""PNG figures a person would rather look at than read: reconstructions, prior samples, the
latent space, learning curves. Headless (Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _as_images(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) or (N, D) -> (N, H, W[, 3]) for imshow."""
    if x.ndim == 2:
        side = int(round(np.sqrt(x.shape[1])))
        x = x.reshape(-1, 1, side, side) if side * side == x.shape[1] else x[:, None, None, :]
    x = np.clip(x, 0, 1)
    return x[:, 0] if x.shape[1] == 1 else np.transpose(x, (0, 2, 3, 1))


def image_grid(images: np.ndarray, path: Path, title: str, cols: int = 8) -> Path:
    imgs = _as_images(images)
    rows = int(np.ceil(len(imgs) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.1 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img in zip(axes.flat, imgs, strict=False):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def reconstructions(originals: np.ndarray, recon: np.ndarray, path: Path, n: int = 8) -> Path:
    """Top row originals, bottom row their reconstructions (decoder means)."""
    pairs = np.concatenate([originals[:n], recon[:n]])
    return image_grid(pairs, path, "test originals (top) and reconstructions (bottom)", cols=n)


def latent_projection(mu: np.ndarray, labels: np.ndarray | None, path: Path) -> Path:
    """Posterior means projected to 2-D (first two principal components), coloured by label."""
    centred = mu - mu.mean(0)
    if mu.shape[1] > 2:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
    else:
        xy = np.pad(centred, ((0, 0), (0, 2 - mu.shape[1])))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels if labels is not None else "tab:blue", s=6,
                    cmap="tab10" if labels is not None else None)  # fmt: skip
    if labels is not None:
        fig.colorbar(sc, ax=ax, label="label")
    ax.set_xlabel("PC 1 of posterior mean")
    ax.set_ylabel("PC 2 of posterior mean")
    ax.set_title("latent space (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def learning_curves(history: list[dict], path: Path, likelihood: str) -> Path:
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(epochs, [h["train_loss"] for h in history], label="train objective")
    ax.plot(epochs, [h["val_neg_elbo"] for h in history], label="validation -ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"nats per example ({likelihood})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
