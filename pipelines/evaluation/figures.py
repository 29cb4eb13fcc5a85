"""PNG figures a person would rather look at than read: reconstructions, prior samples, the
latent space, learning curves. Headless (Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipelines.atomic import atomic_path  # noqa: E402

# Written into every PNG's text chunks: how generate and evaluate tell a file they may
# overwrite (theirs) from one a person put there.
PNG_METADATA = {"Software": "vae-pipeline"}
_DPI = 100
# 2000 px at _DPI: larger grids are drawn downsampled, not bigger (drawing takes about
# 100 bytes per output pixel at its peak, so this bounds memory near 400 MB).
_MAX_SIDE_IN = 20.0


def save(fig: plt.Figure, path: Path) -> Path:
    """Write fig as a PNG carrying PNG_METADATA, atomically (no partial or temporary file is
    left on failure), and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=_DPI, format="png", metadata=PNG_METADATA)
    finally:
        plt.close(fig)
    return path


def is_ours(path: Path) -> bool:
    """path is a PNG that vae-pipeline wrote (its Software text chunk says so)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.format == "PNG" and img.text.get("Software") == PNG_METADATA["Software"]
    except Exception:  # any unreadable or foreign file is simply not ours
        return False


def _as_images(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) or (N, D) -> (N, H, W[, 3]) for imshow."""
    if x.ndim == 2:
        side = int(round(np.sqrt(x.shape[1])))
        x = x.reshape(-1, 1, side, side) if side * side == x.shape[1] else x[:, None, None, :]
    x = np.clip(x, 0, 1)
    return x[:, 0] if x.shape[1] == 1 else np.transpose(x, (0, 2, 3, 1))


def tile(imgs: np.ndarray, cols: int, pad: int = 1) -> np.ndarray:
    """(N, H, W[, 3]) -> one (rows*(H+pad)+pad, cols*(W+pad)+pad[, 3]) array, white between."""
    n, h, w = imgs.shape[:3]
    rows = max(1, -(-n // cols))
    canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, *imgs.shape[3:]), np.float32)
    for i, img in enumerate(imgs):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y : y + h, x : x + w] = img
    return canvas


def grid_cols(n: int, cols: int = 8) -> int:
    """At least cols wide, and square-ish for large n (4096 images: 64 x 64, not 8 x 512)."""
    return max(1, min(n, max(cols, int(np.ceil(np.sqrt(n))))))


def image_grid(images: np.ndarray, path: Path, title: str, cols: int = 8) -> Path:
    """image_grid_figure, saved to path."""
    return save(image_grid_figure(images, title, cols), path)


def image_grid_figure(images: np.ndarray, title: str, cols: int = 8) -> plt.Figure:
    """All images tiled into one array, drawn with one imshow: time and memory grow with the
    pixels, not with one matplotlib axes per image."""
    imgs = _as_images(images)
    cols = max(1, min(cols, len(imgs)))
    rows = max(1, -(-len(imgs) // cols))
    side = max(rows, cols)
    # Every step-th pixel of large images: the drawing shows no more than that anyway.
    step = max(1, -(-side * max(imgs.shape[1:3]) // int(2 * _MAX_SIDE_IN * _DPI)))
    canvas = tile(imgs[:, ::step, ::step], cols)
    # About 1.1 inch per image for small grids, never fewer device pixels than image pixels
    # where that fits, and never over _MAX_SIDE_IN.
    per_image = min(max(min(1.1, 16.0 / side), imgs.shape[1] / _DPI), _MAX_SIDE_IN / side)
    # Wide enough for the title (about 0.075 inch per character at 9 pt) even for one image.
    width, height = max(cols * per_image, 0.075 * len(title) + 0.3), rows * per_image
    fig = plt.figure(figsize=(width, height + 0.4))
    ax = fig.add_axes((0, 0, 1, height / (height + 0.4)))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    fig.suptitle(title, fontsize=9, y=1 - 0.05 / (height + 0.4))
    return fig


def reconstructions(originals: np.ndarray, recon: np.ndarray, path: Path, n: int = 8) -> Path:
    """reconstructions_figure, saved to path."""
    return save(reconstructions_figure(originals, recon, n), path)


def reconstructions_figure(originals: np.ndarray, recon: np.ndarray, n: int = 8) -> plt.Figure:
    """Top row originals, bottom row their reconstructions (decoder means)."""
    pairs = np.concatenate([originals[:n], recon[:n]])
    return image_grid_figure(pairs, "test originals (top) and reconstructions (bottom)", cols=n)


def latent_projection(
    mu: np.ndarray, labels: np.ndarray | None, path: Path, classes: list[str] | None = None
) -> Path:
    """latent_projection_figure, saved to path."""
    return save(latent_projection_figure(mu, labels, classes), path)


def latent_projection_figure(
    mu: np.ndarray, labels: np.ndarray | None, classes: list[str] | None = None
) -> plt.Figure:
    """Posterior means projected to 2-D (first two principal components), coloured by label;
    with the source's class names (Fashion-MNIST's "T-shirt/top", ...), a legend of names."""
    centred = mu - mu.mean(0)
    if mu.shape[1] > 2:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
    else:
        xy = np.pad(centred, ((0, 0), (0, 2 - mu.shape[1])))
    named = labels is not None and classes is not None and len(classes) <= 20
    fig, ax = plt.subplots(figsize=(6.5 if named else 5, 4.5))
    if named:
        cmap = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
        for k, name in enumerate(classes):
            keep = labels == k
            if keep.any():
                ax.scatter(xy[keep, 0], xy[keep, 1], s=6, color=cmap(k), label=str(name))
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=2)
    else:
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels if labels is not None else "tab:blue", s=6,
                        cmap="tab10" if labels is not None else None)  # fmt: skip
        if labels is not None:
            fig.colorbar(sc, ax=ax, label="label")
    ax.set_xlabel("PC 1 of posterior mean")
    ax.set_ylabel("PC 2 of posterior mean")
    ax.set_title("latent space (test split)")
    fig.tight_layout()
    return fig


def learning_curves(history: list[dict], path: Path, likelihood: str) -> Path:
    """learning_curves_figure, saved to path."""
    return save(learning_curves_figure(history, likelihood), path)


def learning_curves_figure(history: list[dict], likelihood: str) -> plt.Figure:
    """Training objective and validation -ELBO per epoch, in nats per example."""
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(epochs, [h["train_loss"] for h in history], label="train objective")
    ax.plot(epochs, [h["val_neg_elbo"] for h in history], label="validation -ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"nats per example ({likelihood})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
