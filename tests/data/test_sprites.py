"""The sprites generator: the dSprites factor grid, deterministic rendering, prefix-stable sampling.

Axis convention under test: pos_x moves a sprite along columns (left to right), pos_y along rows
(top to bottom), and orientation turns it counterclockwise as the image is viewed.
"""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

from pipelines.data.sources import sprites
from pipelines.errors import PipelineError

MAX_SCALE = sprites.FACTOR_SIZES[1] - 1
LAST_POS = sprites.FACTOR_SIZES[3] - 1
MID_POS = 16


def grid_index(shape=0, scale=MAX_SCALE, orientation=0, pos_x=MID_POS, pos_y=MID_POS) -> int:
    factors = (shape, scale, orientation, pos_x, pos_y)
    return int(np.ravel_multi_index(factors, sprites.FACTOR_SIZES))


def render_one(**factors: int) -> np.ndarray:
    return sprites.render(np.array([grid_index(**factors)]))[0]


def centroid(image: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(image)
    return float(rows.mean()), float(cols.mean())


def test_grid_is_the_dsprites_grid():
    assert sprites.FACTOR_NAMES == ("shape", "scale", "orientation", "pos_x", "pos_y")
    assert sprites.FACTOR_SIZES == (3, 6, 40, 32, 32)
    assert sprites.GRID_SIZE == int(np.prod(sprites.FACTOR_SIZES)) == 737280
    assert sprites.SHAPES == ("square", "ellipse", "heart")
    assert sprites.SIDE == 64


def test_factors_of_round_trips_through_ravel_multi_index():
    rng = np.random.default_rng(1)
    idx = np.concatenate([[0, sprites.GRID_SIZE - 1], rng.integers(0, sprites.GRID_SIZE, 200)])
    factors = sprites.factors_of(idx)
    assert factors.dtype == np.int64 and factors.shape == (len(idx), 5)
    np.testing.assert_array_equal(factors[0], [0, 0, 0, 0, 0])
    np.testing.assert_array_equal(factors[1], np.array(sprites.FACTOR_SIZES) - 1)
    np.testing.assert_array_equal(np.ravel_multi_index(factors.T, sprites.FACTOR_SIZES), idx)


def test_factor_values_span_the_dsprites_ranges():
    first, last = sprites.factor_values(sprites.factors_of(np.array([0, sprites.GRID_SIZE - 1])))
    np.testing.assert_array_equal(first, [0.0, 0.5, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(last, [2.0, 1.0, 2 * np.pi * 39 / 40, 1.0, 1.0], rtol=1e-15)
    assert sprites.factor_values(np.zeros((3, 5), dtype=np.int64)).dtype == np.float64


def test_render_is_deterministic_and_binary_uint8():
    idx = sprites.sample_indices(300)
    a, b = sprites.render(idx), sprites.render(idx)
    assert a.shape == (300, 64, 64) and a.dtype == np.uint8
    assert set(np.unique(a).tolist()) == {0, 255}
    assert a.tobytes() == b.tobytes()


def test_batch_render_equals_one_by_one_across_chunk_boundaries():
    idx = sprites.sample_indices(sprites.CHUNK + 7)
    batch = sprites.render(idx)
    for i in (0, sprites.CHUNK - 1, sprites.CHUNK, len(idx) - 1):
        np.testing.assert_array_equal(batch[i], sprites.render(idx[i : i + 1])[0])


def test_no_sprite_is_empty_or_clipped_even_at_max_scale_in_the_corners():
    corners = itertools.product((0, LAST_POS), (0, LAST_POS))
    extreme = [
        grid_index(shape, MAX_SCALE, angle, x, y)
        for (x, y), shape, angle in itertools.product(corners, range(3), range(40))
    ]
    idx = np.concatenate([extreme, sprites.sample_indices(2000, seed=3)])
    images = sprites.render(idx) > 0
    assert images.sum(axis=(1, 2)).min() > 0
    border = images[:, 0].any(1) | images[:, -1].any(1)
    border |= images[:, :, 0].any(1) | images[:, :, -1].any(1)
    assert not border.any(), f"clipped sprites: {idx[border][:5].tolist()}"


@pytest.mark.parametrize("shape", range(3))
def test_area_grows_with_scale(shape):
    angles_and_positions = list(itertools.product(range(0, 40, 3), (0, 15, 31)))

    def mean_area(scale: int) -> float:
        idx = [grid_index(shape, scale, a, p, p) for a, p in angles_and_positions]
        return float((sprites.render(np.array(idx)) > 0).sum(axis=(1, 2)).mean())

    areas = [mean_area(scale) for scale in range(6)]
    assert all(a < b for a, b in itertools.pairwise(areas)), areas


def test_max_scale_sprite_spans_about_16_to_21_pixels():
    for shape in range(3):
        rows, cols = np.nonzero(render_one(shape=shape))
        span = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
        assert 14 <= span <= 22, (sprites.SHAPES[shape], span)


@pytest.mark.parametrize("shape", range(3))
def test_rotation_by_a_non_symmetric_angle_changes_the_sprite(shape):
    assert not np.array_equal(render_one(shape=shape), render_one(shape=shape, orientation=3))


def test_rotation_repeats_with_each_shapes_symmetry():
    quarter, half = 10, 20  # 90 and 180 degrees
    np.testing.assert_array_equal(render_one(shape=0), render_one(shape=0, orientation=quarter))
    np.testing.assert_array_equal(render_one(shape=1), render_one(shape=1, orientation=half))
    assert not np.array_equal(render_one(shape=1), render_one(shape=1, orientation=quarter))
    assert not np.array_equal(render_one(shape=2), render_one(shape=2, orientation=half))


def test_orientation_turns_counterclockwise():
    # the ellipse's long axis lies along x at angle 0; at 45 degrees counterclockwise its
    # top end (smallest row) is to the right of its bottom end
    rows, cols = np.nonzero(render_one(shape=1, orientation=5))
    assert cols[rows == rows.min()].mean() > cols[rows == rows.max()].mean()


def test_heart_stands_upright_at_angle_zero():
    # lobes at the top: the upper half of the heart is wider than the lower half
    image = render_one(shape=2) > 0
    rows = np.nonzero(image.any(axis=1))[0]
    middle = (rows.min() + rows.max()) // 2
    widths = image.sum(axis=1)
    assert widths[rows.min() : middle].sum() > widths[middle : rows.max() + 1].sum()


@pytest.mark.parametrize("shape", range(3))
def test_pos_x_moves_the_centroid_right_and_pos_y_moves_it_down(shape):
    row, col = centroid(render_one(shape=shape, pos_x=4, pos_y=4))
    right_row, right_col = centroid(render_one(shape=shape, pos_x=28, pos_y=4))
    down_row, down_col = centroid(render_one(shape=shape, pos_x=4, pos_y=28))
    # 24 position steps are ~31 px; sub-pixel placement may shift the other axis a little
    assert right_col > col + 20 and abs(right_row - row) < 1
    assert down_row > row + 20 and abs(down_col - col) < 1


def test_the_three_shapes_differ_at_equal_other_factors():
    for orientation in (0, 7):
        images = [render_one(shape=s, orientation=orientation) for s in range(3)]
        for a, b in itertools.combinations(images, 2):
            assert not np.array_equal(a, b)


def test_sample_indices_are_distinct_int64_and_in_range():
    idx = sprites.sample_indices(50_000, seed=7)
    assert idx.dtype == np.int64 and len(idx) == 50_000
    assert len(np.unique(idx)) == 50_000
    assert idx.min() >= 0 and idx.max() < sprites.GRID_SIZE
    assert not np.all(np.diff(idx) > 0), "a prefix of a permutation, not a sorted subset"


def test_sample_indices_are_prefix_stable_so_a_grown_dataset_keeps_its_samples():
    np.testing.assert_array_equal(sprites.sample_indices(1000)[:900], sprites.sample_indices(900))
    np.testing.assert_array_equal(sprites.sample_indices(1000), sprites.sample_indices(1000))
    assert not np.array_equal(sprites.sample_indices(100, seed=1), sprites.sample_indices(100))


def test_sample_indices_do_not_share_memory_with_the_cached_permutation():
    a = sprites.sample_indices(10)
    a[:] = -1
    assert sprites.sample_indices(10).min() >= 0


def test_full_grid_sample_is_every_index_once_and_extends_every_smaller_one():
    full = sprites.sample_indices(sprites.GRID_SIZE)
    np.testing.assert_array_equal(np.sort(full), np.arange(sprites.GRID_SIZE))
    np.testing.assert_array_equal(full[:5000], sprites.sample_indices(5000))


@pytest.mark.parametrize("n", [0, -5, sprites.GRID_SIZE + 1, 2.5])
def test_bad_size_raises_one_line_error_naming_data_size(n):
    with pytest.raises(PipelineError, match=r"data\.size.*1\.\.737280") as err:
        sprites.sample_indices(n)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [np.array([-1]), np.array([sprites.GRID_SIZE]), np.zeros((2, 2))])
def test_render_rejects_indices_off_the_grid(bad):
    with pytest.raises(PipelineError, match="sprite indices"):
        sprites.render(bad)


def test_render_of_a_strided_grid_hashes_the_same_twice():
    idx = np.arange(0, sprites.GRID_SIZE, 7919)
    first = hashlib.sha256(sprites.render(idx).tobytes()).hexdigest()
    second = hashlib.sha256(sprites.render(idx.copy()).tobytes()).hexdigest()
    assert first == second


def test_sample_key_is_stable_and_zero_padded():
    assert sprites.sample_key(42) == "sprites-000042"
    assert sprites.sample_key(np.int64(sprites.GRID_SIZE - 1)) == "sprites-737279"


# Every 37th sprite of the grid (19,927: every shape, scale and angle), as rendered before the
# renderer worked in place (the whole grid was checked then, all 737,280). A renderer change
# that moves one pixel changes every staged sprite dataset's version: a decision, not an
# accident.
STAGED_RENDER_SHA256 = "c7a218d38eb056252ebfccd28c394278a373d9e969975f50ba0fd2ed06b01e34"


def test_render_gives_the_pixels_sprites_were_staged_with():
    idx = np.arange(0, sprites.GRID_SIZE, 37)
    assert hashlib.sha256(sprites.render(idx).tobytes()).hexdigest() == STAGED_RENDER_SHA256
    # Any chunking of the same indices gives the same pixels (the scratch is reused).
    part = np.concatenate([sprites.render(idx[a : a + 300]) for a in range(0, 1200, 300)])
    np.testing.assert_array_equal(part, sprites.render(idx[:1200]))
