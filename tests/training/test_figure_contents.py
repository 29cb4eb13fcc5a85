"""The evaluation figures show the data they claim to, read back from the saved PNGs and from
the matplotlib artists: a figure that looks right but draws the wrong examples, in the wrong
order or with the wrong colours fails here. No Ray, MLflow or DVC: a small model trained
in-process on the digits."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.evaluation import evaluate as evaluate_stage
from pipelines.evaluation import figures
from pipelines.scoring import held_out_pass
from pipelines.scoring.held_out_pass import HeldOutPass
from vae import ModelConfig, TrainConfig, build_model, fit

# The gray colormap has 256 levels and the PNG 8 bits: a drawn value is within 2/255 of it.
GREY_TOL = 2.5 / 255


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def model(digits_split):
    """Trained a little, so that each example's reconstruction differs visibly from the
    others' and from its input (an untrained decoder draws about the same grey for all)."""
    train, val, _ = digits_split
    cfg = ModelConfig(input_shape=(1, 8, 8), latent_dim=2, hidden=(32,))
    net = build_model(cfg, seed=0)
    fit(net, train, val, TrainConfig(epochs=15, batch_size=64, seed=0))
    return net.eval()


@pytest.fixture
def test_batches(digits_split):
    """Three loader-shaped batches (the last one short), labelled 0-9 in turn: a label moved
    by one place no longer matches its example."""
    x = digits_split[2][:70]
    labels = torch.arange(70) % 10
    return [
        {
            "x": x[i : i + 32],
            "label": labels[i : i + 32],
            "key": [f"k{j}" for j in range(i, min(i + 32, 70))],
        }
        for i in range(0, 70, 32)
    ]


@pytest.fixture
def drawn(monkeypatch):
    """Every figure evaluate saves, by file name, as the Figure object that was written."""
    saved: dict[str, plt.Figure] = {}
    real_save = figures.save

    def recording_save(fig: plt.Figure, path: Path) -> Path:
        saved[Path(path).name] = fig
        return real_save(fig, path)

    monkeypatch.setattr(figures, "save", recording_save)
    return saved


def _spy(monkeypatch, model, method: str) -> list:
    """Calls through to model.<method> and keeps each call's (args, result)."""
    calls, real = [], getattr(model, method)

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append((args, result))
        return result

    monkeypatch.setattr(model, method, spy)
    return calls


def _png_pixels(fig: plt.Figure, png: Path) -> np.ndarray:
    """The grey value the saved PNG shows at the centre of every pixel of fig's one image (the
    tiled canvas), located through the figure's own transforms, in [0, 1]."""
    image = fig.axes[0].images[0]
    rows, cols = image.get_array().shape[:2]
    fig.canvas.draw()  # fixes the axes' final position (equal aspect) as savefig did
    jj, ii = np.meshgrid(np.arange(cols), np.arange(rows))
    display = fig.axes[0].transData.transform(np.c_[jj.ravel(), ii.ravel()])
    frac = fig.transFigure.inverted().transform(display)
    with Image.open(png) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float64) / 255
    height, width = rgb.shape[:2]
    px = np.floor(frac[:, 0] * width).astype(int)
    py = np.floor((1 - frac[:, 1]) * height).astype(int)
    sampled = rgb[py, px].reshape(rows, cols, 3)
    assert np.ptp(sampled, axis=-1).max() <= GREY_TOL, "a grey-scale grid drawn in colour"
    return sampled[..., 0]


def _cells(canvas: np.ndarray, n: int, cols: int, h: int = 8, w: int = 8) -> np.ndarray:
    """The n (h, w) cells of a grid with one white pixel around and between the cells, in
    reading order (left to right, then top to bottom)."""
    out = []
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = 1 + r * (h + 1), 1 + c * (w + 1)
        out.append(canvas[y : y + h, x : x + w])
    return np.stack(out)


def _shown(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, 1, 8, 8) as drawn: one grey value per pixel, clipped to [0, 1]."""
    return np.clip(np.asarray(images, dtype=np.float64)[:, 0], 0, 1)


def _min_difference(images: np.ndarray) -> float:
    """The smallest, over every two of images, of their largest pixel difference."""
    flat = images.reshape(len(images), -1)
    diff = np.abs(flat[:, None] - flat[None]).max(-1)
    return float(diff[~np.eye(len(images), dtype=bool)].min())


def _distances(points: np.ndarray) -> np.ndarray:
    return np.linalg.norm(points[:, None] - points[None], axis=-1)


def _run_figures(model, batches, tmp_path: Path, history: list[dict] | None = None):
    out, tdir = tmp_path / "evaluate", tmp_path / "train"
    out.mkdir()
    tdir.mkdir()
    if history is not None:
        (tdir / "history.json").write_text(json.dumps(history))
    held_out = HeldOutPass(model, batches, all_means=False)
    for _ in held_out:  # as vae.evaluate goes through it
        pass
    return evaluate_stage._figures(model, held_out, out, tdir, "gaussian", seed=0)


# -- evaluate's figures, end to end through the saved PNGs ------------------------------------


def test_reconstruction_grid_shows_the_models_reconstructions_of_the_shown_examples(
    model, test_batches, drawn, monkeypatch, tmp_path
):
    calls = _spy(monkeypatch, model, "forward")
    figs = _run_figures(model, test_batches, tmp_path)

    assert len(calls) == 1, "one forward pass for the reconstructions"
    (shown_x, *_), output = calls[0]
    first = test_batches[0]["x"][:8]
    assert torch.equal(shown_x, first), "reconstructed other examples than the first 8 test ones"
    cells = _cells(_png_pixels(drawn["reconstructions.png"], figs["reconstructions"]), 16, 8)
    np.testing.assert_allclose(cells[:8], _shown(first), atol=GREY_TOL)
    np.testing.assert_allclose(cells[8:], _shown(output.recon_x), atol=GREY_TOL)
    # The check is only as sharp as the reconstructions are distinct from their inputs and
    # from each other.
    drawn_pairs = np.concatenate([_shown(first), _shown(output.recon_x)])
    assert _min_difference(drawn_pairs) > 2 * GREY_TOL


def test_sample_grid_shows_the_64_prior_samples_the_model_drew_in_order(
    model, test_batches, drawn, monkeypatch, tmp_path
):
    calls = _spy(monkeypatch, model, "sample")
    figs = _run_figures(model, test_batches, tmp_path)

    assert [args for args, _ in calls] == [(64,)]
    samples = calls[0][1]
    # Sharp enough to see a shift by one cell: no two neighbours in reading order look alike.
    neighbours = np.abs(np.diff(_shown(samples), axis=0)).reshape(63, -1).max(-1)
    assert neighbours.min() > 2 * GREY_TOL
    cells = _cells(_png_pixels(drawn["samples.png"], figs["samples"]), 64, 8)
    np.testing.assert_allclose(cells, _shown(samples), atol=GREY_TOL)
    assert "decoder means" in drawn["samples.png"].texts[0].get_text()


def test_latent_plot_has_one_point_per_test_example_at_its_posterior_mean_coloured_by_label(
    model, test_batches, drawn, tmp_path
):
    _run_figures(model, test_batches, tmp_path)

    x = torch.cat([b["x"] for b in test_batches])
    mu = model.embed(x)[0].numpy().astype(np.float64)
    (points,) = drawn["latent.png"].axes[0].collections
    # A 2-d latent space is its own projection: each point is its example's mean, centred.
    np.testing.assert_allclose(points.get_offsets(), mu - mu.mean(0), atol=1e-5)
    labels = torch.cat([b["label"] for b in test_batches]).numpy()
    np.testing.assert_array_equal(points.get_array(), labels)


def test_latent_plot_keeps_labels_beside_their_points_when_capped(
    model, test_batches, drawn, monkeypatch, tmp_path
):
    """Past MAX_LATENT_POINTS whole batches are left out, their labels with them."""
    monkeypatch.setattr(held_out_pass, "MAX_LATENT_POINTS", 40)
    _run_figures(model, test_batches, tmp_path)

    (points,) = drawn["latent.png"].axes[0].collections
    kept = test_batches[:2]  # 32 points, under the cap; 64 after the second batch
    mu = model.embed(torch.cat([b["x"] for b in kept]))[0].numpy().astype(np.float64)
    np.testing.assert_allclose(points.get_offsets(), mu - mu.mean(0), atol=1e-5)
    labels = torch.cat([b["label"] for b in kept]).numpy()
    np.testing.assert_array_equal(points.get_array(), labels)


def test_learning_curves_plot_the_training_history_in_evaluate(
    model, test_batches, drawn, tmp_path
):
    history = [{"epoch": e, "train_loss": 50.0 - 7 * e, "val_neg_elbo": 60.0 - 5 * e}
               for e in range(4)]  # fmt: skip
    figs = _run_figures(model, test_batches, tmp_path, history)

    assert Path(figs["learning_curves"]).name == "learning_curves.png"
    lines = {line.get_label(): line for line in drawn["learning_curves.png"].axes[0].lines}
    assert list(lines["train objective"].get_ydata()) == [h["train_loss"] for h in history]
    assert list(lines["validation -ELBO"].get_ydata()) == [h["val_neg_elbo"] for h in history]


def test_evaluate_draws_no_learning_curves_without_a_training_history(
    model, test_batches, drawn, tmp_path
):
    figs = _run_figures(model, test_batches, tmp_path)
    assert set(figs) == {"reconstructions", "samples", "latent"}
    assert sorted(drawn) == ["latent.png", "reconstructions.png", "samples.png"]


# -- the figure functions on their own ---------------------------------------------------------


def test_image_grid_png_shows_each_image_in_its_cell_in_reading_order(tmp_path):
    """Seven distinct images in rows of three: cells 0-6 in reading order, the rest white."""
    images = np.random.default_rng(0).random((7, 1, 8, 8))
    path = figures.image_grid(images, tmp_path / "grid.png", "seven", cols=3)
    fig = figures.image_grid_figure(images, "seven", cols=3)

    canvas = _png_pixels(fig, path)
    np.testing.assert_allclose(canvas, fig.axes[0].images[0].get_array(), atol=GREY_TOL)
    cells = _cells(canvas, 9, 3)
    np.testing.assert_allclose(cells[:7], _shown(images), atol=GREY_TOL)
    np.testing.assert_allclose(cells[7:], 1.0, atol=GREY_TOL)
    assert canvas.shape == (3 * 9 + 1, 3 * 9 + 1)


def test_image_grid_draws_flat_vectors_as_square_images():
    """Array inputs of 64 values per example are drawn as the 8 x 8 images they are."""
    images = np.random.default_rng(1).random((4, 1, 8, 8))
    fig = figures.image_grid_figure(images.reshape(4, 64), "flat", cols=4)
    cells = _cells(np.asarray(fig.axes[0].images[0].get_array()), 4, 4)
    np.testing.assert_allclose(cells, _shown(images))


def test_reconstruction_figure_pairs_only_the_first_n_examples_with_their_reconstructions():
    rng = np.random.default_rng(2)
    originals, recon = rng.random((10, 1, 8, 8)), rng.random((10, 1, 8, 8))
    fig = figures.reconstructions_figure(originals, recon, n=4)
    canvas = np.asarray(fig.axes[0].images[0].get_array())
    assert canvas.shape == (2 * 9 + 1, 4 * 9 + 1), "exactly n columns, two rows"
    cells = _cells(canvas, 8, 4)
    np.testing.assert_allclose(cells[:4], _shown(originals[:4]))
    np.testing.assert_allclose(cells[4:], _shown(recon[:4]))


def test_latent_projection_of_a_wide_code_keeps_every_point_and_their_distances():
    """Means that lie on a tilted plane in 5-d: the top two principal components span that
    plane, so the projection keeps every pairwise distance (and the order of the points);
    the first two coordinates, a shuffle or a dropped point would not."""
    rng = np.random.default_rng(3)
    plane = np.linalg.qr(rng.normal(size=(5, 2)))[0].T  # two orthonormal 5-d directions
    mu = rng.normal(size=(40, 2)) * [3.0, 1.0] @ plane + rng.normal(size=5)
    labels = rng.integers(0, 10, size=40)
    fig = figures.latent_projection_figure(mu, labels)

    (points,) = fig.axes[0].collections
    xy = np.asarray(points.get_offsets())
    assert xy.shape == (40, 2)
    np.testing.assert_allclose(_distances(xy), _distances(mu), atol=1e-9)
    np.testing.assert_allclose(xy.mean(0), 0, atol=1e-9)
    np.testing.assert_array_equal(points.get_array(), labels)
    assert xy[:, 0].var() > xy[:, 1].var(), "PC 1 on the x axis"


def test_latent_projection_without_labels_draws_one_colour_and_no_colourbar():
    mu = np.random.default_rng(4).normal(size=(12, 2))
    fig = figures.latent_projection_figure(mu, None)
    (points,) = fig.axes[0].collections
    np.testing.assert_allclose(points.get_offsets(), mu - mu.mean(0))
    assert points.get_array() is None and len(fig.axes) == 1


def test_learning_curves_plot_train_and_validation_against_epoch_in_named_nats():
    history = [{"epoch": e, "train_loss": 9.0 - e, "val_neg_elbo": 11.0 - e / 2}
               for e in (0, 1, 3)]  # fmt: skip
    fig = figures.learning_curves_figure(history, "bernoulli")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"train objective", "validation -ELBO"}
    for label, key in (("train objective", "train_loss"), ("validation -ELBO", "val_neg_elbo")):
        assert list(lines[label].get_xdata()) == [0, 1, 3]
        assert list(lines[label].get_ydata()) == [h[key] for h in history]
    assert ax.get_ylabel() == "nats per example (bernoulli)"


def test_the_latent_plot_names_the_classes_when_the_source_has_names():
    """Fashion-MNIST's classes are garments, not 0-9: the legend says which is which."""
    rng = np.random.default_rng(0)
    mu, labels = rng.normal(size=(60, 3)), np.repeat(np.arange(3), 20)
    names = ["T-shirt/top", "Trouser", "Pullover"]
    fig = figures.latent_projection_figure(mu, labels, names)
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == names
    plain = figures.latent_projection_figure(mu, labels)  # no names: the colour bar of labels
    assert plain.axes[0].get_legend() is None and len(plain.axes) == 2
