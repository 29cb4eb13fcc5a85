"""Data sources: IDX parsing, offline MNIST, array files, image folders, and bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.data.sources import idx
from pipelines.data.sources.catalog import load_source, open_source
from pipelines.data.sources.idx import FILES, read_idx
from pipelines.errors import PipelineError
from pipelines.params import DataParams
from tests.data.conftest import save_array
from tests.servers import closed_port


def idx_bytes(arr: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    header = bytes([0, 0, codes[arr.dtype], arr.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def write_mnist_cache(folder: Path, n_train: int = 6, n_test: int = 4) -> np.ndarray:
    """Four small IDX files named like the real ones; returns the train images."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    train = rng.integers(0, 256, (n_train, 5, 5), dtype=np.uint8)
    parts = {
        "train_images": train,
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 5, 5), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for role, arr in parts.items():
        (folder / FILES[role]).write_bytes(gzip.compress(idx_bytes(arr), mtime=0))
    return train


def closed_port_url() -> str:
    return f"http://127.0.0.1:{closed_port()}/"


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


# -- IDX / MNIST ---------------------------------------------------------------------------------


def test_idx_parser_reads_gzipped_and_raw_files_of_several_dtypes(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(images)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), images)
    ints = np.array([1, -2, 300], dtype=">i4")
    (tmp_path / "b").write_bytes(idx_bytes(ints))
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), [1, -2, 300])
    floats = np.array([[0.5, -1.25]], dtype=">f4")
    (tmp_path / "c").write_bytes(idx_bytes(floats))
    np.testing.assert_array_equal(read_idx(tmp_path / "c"), [[0.5, -1.25]])


def test_idx_parser_rejects_bad_magic_and_truncation_naming_the_file(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(PipelineError, match="not an IDX file") as exc:
        read_idx(bad)
    assert str(bad) in one_line(exc)
    cut = tmp_path / "cut-idx"
    cut.write_bytes(idx_bytes(np.zeros((3, 4, 4), np.uint8))[:-5])
    with pytest.raises(PipelineError, match="implies") as exc:
        read_idx(cut)
    assert str(cut) in one_line(exc)


def test_mnist_loads_from_cached_idx_files_without_network(tmp_path):
    train = write_mnist_cache(tmp_path / "raw" / "mnist")
    params = DataParams(
        source="mnist", cache_dir=str(tmp_path / "raw"), download_url=closed_port_url()
    )
    data = load_source(params)
    assert data.x.shape == (10, 1, 5, 5) and data.x.dtype == np.float32
    assert data.keys[0] == "mnist-train-00000" and data.keys[-1] == "mnist-test-00003"
    np.testing.assert_allclose(data.x[:6, 0], train / 255.0, rtol=1e-6)
    assert data.labels.dtype == np.int64 and data.version.startswith("sha256:")


def test_mnist_reads_any_range_across_the_train_and_test_parts(tmp_path):
    """The two official parts are read in place, not concatenated: a range that straddles
    them, or lies in either one, gives the same images, keys and labels as the whole."""
    write_mnist_cache(tmp_path / "raw" / "mnist", n_train=7, n_test=5)
    params = DataParams(source="mnist", cache_dir=str(tmp_path / "raw"))
    src = open_source(params)
    whole = src.read(0, src.n)
    assert whole.x.shape == (12, 1, 5, 5) and src.n == 12
    for a, b in [(0, 7), (7, 12), (5, 9), (2, 3), (9, 12), (6, 8)]:
        part = src.read(a, b)
        np.testing.assert_array_equal(part.x, whole.x[a:b])
        np.testing.assert_array_equal(part.labels, whole.labels[a:b])
        assert part.keys == whole.keys[a:b] == src.keys(a, b) and part.start == a


def test_mnist_offline_fails_with_one_line_message_saying_what_to_do(tmp_path):
    params = DataParams(
        source="fashion_mnist", cache_dir=str(tmp_path / "raw"), download_url=closed_port_url()
    )
    with pytest.raises(PipelineError) as exc:
        load_source(params)
    msg = one_line(exc)
    assert "cannot download fashion_mnist" in msg
    assert str(tmp_path / "raw" / "fashion_mnist") in msg and "train-images-idx3-ubyte.gz" in msg
    assert "data.source: digits" in msg
    assert not [p for p in (tmp_path / "raw" / "fashion_mnist").iterdir()]  # no partial files


def test_fashion_mnist_reads_the_debian_package_folder_in_place_without_network(
    tmp_path, monkeypatch
):
    system = tmp_path / "usr-share-datasets"
    train = write_mnist_cache(system)
    monkeypatch.setitem(idx.SYSTEM_FOLDERS, "fashion_mnist", system)
    monkeypatch.setitem(idx.MIRRORS, "fashion_mnist", (closed_port_url(),))
    cache = tmp_path / "raw"
    data = load_source(DataParams(source="fashion_mnist", cache_dir=str(cache)))
    assert data.x.shape == (10, 1, 5, 5) and data.keys[0] == "fashion_mnist-train-00000"
    np.testing.assert_allclose(data.x[:6, 0], train / 255.0, rtol=1e-6)
    assert not cache.exists(), "read in place: nothing copied into the cache"
    # Files a user put into the cache folder still come first.
    mine = write_mnist_cache(cache / "fashion_mnist", n_train=3)
    data = load_source(DataParams(source="fashion_mnist", cache_dir=str(cache)))
    assert data.x.shape[0] == 7 and np.allclose(data.x[:3, 0], mine / 255.0)


@pytest.mark.slow
def test_real_fashion_mnist_from_debian_has_the_official_70000_images_and_balanced_classes(
    tmp_path,
):
    """Real data from Debian's dataset-fashion-mnist, which `make test` installs."""
    data = load_source(DataParams(source="fashion_mnist", cache_dir=str(tmp_path / "raw")))
    assert data.x.shape == (70_000, 1, 28, 28) and data.scaling == "x/255"
    assert data.keys[59_999] == "fashion_mnist-train-59999"
    assert data.keys[60_000] == "fashion_mnist-test-00000"
    assert np.bincount(data.labels[:60_000]).tolist() == [6000] * 10
    assert np.bincount(data.labels[60_000:]).tolist() == [1000] * 10
    assert data.labels[:4].tolist() == [9, 0, 0, 3]  # the published train-labels file's start
    assert data.classes[9] == "Ankle boot"


# -- array files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, expected",
    [((5, 6, 7), (5, 1, 6, 7)), ((5, 3, 6, 7), (5, 3, 6, 7)), ((5, 6, 7, 3), (5, 3, 6, 7))],
)
def test_array_source_accepts_hw_chw_and_hwc_layouts(tmp_path, shape, expected):
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = load_source(DataParams(source="array", path=str(save_array(tmp_path / "x.npy", x))))
    assert data.x.shape == expected and data.x.dtype == np.float32
    assert data.x.max() <= 1.0 and data.scaling == "x/255" and data.labels is None
    assert data.keys[:2] == ["array-0000000", "array-0000001"]


def test_array_npz_with_labels_keeps_them_as_int64(tmp_path):
    x = np.random.default_rng(0).random((4, 8, 8))
    path = save_array(tmp_path / "d.npz", x, np.array([0, 1, 1, 2]))
    data = load_source(DataParams(source="array", path=str(path)))
    assert data.labels.tolist() == [0, 1, 1, 2] and data.labels.dtype == np.int64
    np.testing.assert_allclose(data.x[:, 0], x, rtol=1e-6)


def _nan_at_3():
    x = np.full((5, 4, 4), 0.5)
    x[3, 1, 2] = np.nan
    return x


def _inf_at_2():
    x = np.full((5, 4, 4), 0.5, np.float32)
    x[2, 0, 0] = np.inf
    return x


@pytest.mark.parametrize(
    "make, names",
    [
        (_nan_at_3, ["array-0000003", "NaN"]),
        (_inf_at_2, ["array-0000002", "inf"]),
        (lambda: np.full((5, 4, 4), 1.5), ["array-0000000", "[0, 1]"]),
        (lambda: np.full((5, 4, 4), 300, np.int32), ["array-0000000", "0..255"]),
        (lambda: np.array([["a", "b"], ["c", "d"]]), ["dtype <U1"]),
        (lambda: np.zeros((0, 4, 4), np.uint8), ["no samples"]),
        (lambda: np.zeros((5, 16), np.uint8), ["shape (5, 16)"]),
        (lambda: np.zeros((5, 4, 4, 5), np.uint8), ["shape (5, 4, 4, 5)"]),
    ],
    ids=["nan", "inf", "above-one", "int-range", "strings", "empty", "flat", "channels"],
)
def test_bad_array_is_a_one_line_error_naming_the_sample_or_file(tmp_path, make, names):
    path = save_array(tmp_path / "bad.npy", make())
    with pytest.raises(PipelineError) as exc:
        load_source(DataParams(source="array", path=str(path)))
    msg = one_line(exc)
    assert str(path) in msg
    for name in names:
        assert name in msg


def test_object_array_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "ragged.npy"
    np.save(path, np.array([np.zeros(3), np.zeros(4)], dtype=object), allow_pickle=True)
    with pytest.raises(PipelineError, match="dtype object") as exc:
        load_source(DataParams(source="array", path=str(path)))
    assert str(path) in one_line(exc)


def test_labels_of_another_length_than_the_images_are_refused(tmp_path):
    path = save_array(tmp_path / "d.npz", np.zeros((5, 4, 4), np.uint8), np.arange(4))
    with pytest.raises(PipelineError, match="labels have shape \\(4,\\)") as exc:
        load_source(DataParams(source="array", path=str(path)))
    assert "5 samples" in one_line(exc)


def test_missing_array_file_says_to_set_data_path(tmp_path):
    with pytest.raises(PipelineError, match="not found; set data.path"):
        load_source(DataParams(source="array", path=str(tmp_path / "nope.npy")))
    with pytest.raises(PipelineError, match="needs data.path"):
        load_source(DataParams(source="array"))


# -- image folders -------------------------------------------------------------------------------


def write_image(path: Path, mode: str, size: tuple[int, int], value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = value if mode == "L" else (value, 0, 255 - value)
    Image.new(mode, size, fill).save(path)


def test_image_folder_mixes_grey_and_rgb_png_jpeg_and_resizes(tmp_path):
    write_image(tmp_path / "imgs" / "a.png", "L", (10, 12), 255)
    write_image(tmp_path / "imgs" / "b.jpg", "RGB", (20, 20))
    (tmp_path / "imgs" / ".DS_Store").write_bytes(b"\0junk")  # hidden: ignored
    grey = load_source(DataParams(source="images", path=str(tmp_path / "imgs"), image_size=(6, 8)))
    assert grey.x.shape == (2, 1, 6, 8) and grey.labels is None
    assert grey.keys == ["img-a_png", "img-b_jpg"]
    assert grey.x[0].min() == pytest.approx(1.0)
    rgb = load_source(
        DataParams(source="images", path=str(tmp_path / "imgs"), image_size=(4, 4), grayscale=False)
    )
    assert rgb.x.shape == (2, 3, 4, 4) and rgb.x.dtype == np.float32


def test_image_subfolders_become_labels(tmp_path):
    for cls, n in (("cat", 2), ("dog", 1)):
        for i in range(n):
            write_image(tmp_path / "imgs" / cls / f"{i}.png", "L", (8, 8))
    data = load_source(DataParams(source="images", path=str(tmp_path / "imgs")))
    assert data.labels.tolist() == [0, 0, 1] and data.classes == ["cat", "dog"]


def test_unreadable_image_is_a_one_line_error_naming_the_file(tmp_path):
    write_image(tmp_path / "imgs" / "ok.png", "L", (8, 8))
    bad = tmp_path / "imgs" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(PipelineError, match="cannot read image") as exc:
        load_source(DataParams(source="images", path=str(tmp_path / "imgs")))
    assert str(bad) in one_line(exc)


def test_non_image_file_in_folder_is_an_error_naming_it(tmp_path):
    write_image(tmp_path / "imgs" / "ok.png", "L", (8, 8))
    (tmp_path / "imgs" / "notes.txt").write_text("hello")
    with pytest.raises(PipelineError, match="not a PNG/JPEG") as exc:
        load_source(DataParams(source="images", path=str(tmp_path / "imgs")))
    assert str(tmp_path / "imgs" / "notes.txt") in one_line(exc)


def test_empty_or_missing_image_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="holds no PNG/JPEG"):
        load_source(DataParams(source="images", path=str(tmp_path / "empty")))
    with pytest.raises(PipelineError, match="not found"):
        load_source(DataParams(source="images", path=str(tmp_path / "missing")))


def test_digits_source_is_checked_and_binarized_on_request():
    data = load_source(DataParams(binarize=True))
    assert data.x.shape == (1797, 1, 8, 8) and set(np.unique(data.x)) <= {0.0, 1.0}
    assert data.version.startswith("sha256:") and data.scaling == "(x/16) >= 0.5"


def test_centre_crop_keeps_the_middle_of_a_wide_image_instead_of_squashing_it(tmp_path):
    """A 40x20 image: black left and right quarters, white middle. Resized to 8x8 it keeps the
    black bands; centre-cropped first, only the white middle (a 20x20 square) remains."""
    from PIL import Image

    img = np.zeros((20, 40), np.uint8)
    img[:, 10:30] = 255
    (tmp_path / "imgs").mkdir()
    Image.fromarray(img).save(tmp_path / "imgs" / "wide.png")
    base = {"source": "images", "path": str(tmp_path / "imgs"), "image_size": (8, 8)}
    squashed = load_source(DataParams(**base))
    cropped = load_source(DataParams(**base, center_crop=True))
    assert squashed.x[0, 0, :, 0].max() == 0.0  # the black band is still there
    assert cropped.x[0].min() == 1.0  # only the white middle
