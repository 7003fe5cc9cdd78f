"""Tests for pair_vit.data: folder listing, robust image loading, ground truth, layout and split."""
from __future__ import annotations

import csv
import logging
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pair_vit.data import (
    DEFAULT_MAX_PIXELS,
    DiscLayout,
    DuplicateIdError,
    ImageLoadError,
    SkipReport,
    list_images,
    load_image,
    load_image_bytes,
    load_images,
    read_ground_truth,
    split_images,
    split_of,
)


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path: Path, im: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims width x height, with no pixel data (an empty IDAT)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"") + _png_chunk(b"IEND", b"")
    )
    return path


def test_load_image_bytes_decodes_as_load_image_does(tmp_path):
    path = save(tmp_path / "a.png", Image.fromarray(noise(40, 30)).convert("RGBA"))
    from_bytes = load_image_bytes(path.read_bytes(), "upload.png", max_side=20)
    assert np.array_equal(np.asarray(from_bytes), np.asarray(load_image(path, max_side=20)))
    for content, reason in [(b"", "empty file"), (b"nope", "not an image"), (path.read_bytes()[:60], "truncated")]:
        with pytest.raises(ImageLoadError, match=reason) as err:
            load_image_bytes(content, "upload.png")
        assert err.value.path == Path("upload.png")
    header = png_header_only(tmp_path / "big.png", 20000, 20000).read_bytes()
    with pytest.raises(ImageLoadError, match="image too large"):
        load_image_bytes(header, max_pixels=1000)


# ----------------------------------------------------------------------------- modes


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(tmp_path / "rot.jpg", Image.fromarray(noise(20, 40)), exif=exif.tobytes())
    im = load_image(path)
    assert im.size == (20, 40)
    assert im.mode == "RGB"
    assert load_image(path, max_side=10).size == (5, 10)


def test_palette_with_transparency_becomes_white(tmp_path):
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((1, 1), 1)
    path = save(tmp_path / "pal.png", im, transparency=0)
    out = np.asarray(load_image(path))
    assert out.shape == (4, 4, 3)
    assert tuple(out[0, 0]) == (255, 255, 255)  # the transparent index
    assert tuple(out[1, 1]) == (255, 0, 0)


def test_palette_without_transparency(tmp_path):
    path = save(tmp_path / "pal.bmp", Image.fromarray(noise(8, 8)).convert("P"))
    assert load_image(path).mode == "RGB"


def test_rgba_transparent_pixel_becomes_white_not_black(tmp_path):
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[0, 0] = (10, 20, 30, 255)  # opaque
    arr[1, 1] = (0, 0, 0, 128)  # half-transparent black -> mid grey on white
    path = save(tmp_path / "a.png", Image.fromarray(arr, "RGBA"))
    out = np.asarray(load_image(path)).astype(int)
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert np.all(np.abs(out[1, 1] - 127) <= 2)


def test_la_grayscale_composited_on_white(tmp_path):
    arr = np.zeros((2, 2, 2), dtype=np.uint8)
    arr[0, 0] = (50, 255)
    path = save(tmp_path / "la.png", Image.fromarray(arr, "LA"))
    out = np.asarray(load_image(path))
    assert tuple(out[0, 0]) == (50, 50, 50)
    assert tuple(out[1, 1]) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    path = save(tmp_path / "c.jpg", Image.new("CMYK", (16, 8), (0, 255, 255, 0)), quality=95)
    out = np.asarray(load_image(path)).astype(int)
    assert out.shape == (8, 16, 3)
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 60  # still red


def test_16bit_gradient_keeps_its_gradient(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    path = save(tmp_path / "g16.png", Image.fromarray(ramp))
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    row = np.asarray(load_image(path))[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0) and len(np.unique(row)) > 200  # not clipped to white


def test_32bit_int_and_float_greyscale(tmp_path):
    ramp = np.linspace(0, 1, 64, dtype=np.float32)
    for name, arr in [("f.tif", ramp), ("i.tif", (ramp * 65535).astype(np.int32))]:
        path = tmp_path / name
        Image.fromarray(np.tile(arr, (3, 1))).save(path)
        with Image.open(path) as raw:
            assert raw.mode in ("F", "I")
        row = np.asarray(load_image(path))[0, :, 0].astype(int)
        assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row) >= 0)
    # Small integer levels are already 8-bit: kept as they are, not stretched.
    Image.fromarray(np.full((2, 2), 100, dtype=np.int32)).save(tmp_path / "small.tif")
    assert np.asarray(load_image(tmp_path / "small.tif")).max() == 100


def test_list_images_ignores_other_image_formats(tmp_path):
    # .tif is loadable by load_image but is not a listed image extension.
    Image.new("F", (2, 2)).save(tmp_path / "x.tif")
    assert list_images(tmp_path) == {}


def test_one_bit_and_l(tmp_path):
    one = save(tmp_path / "one.png", Image.new("1", (5, 3), 1))
    grey = save(tmp_path / "grey.jpg", Image.new("L", (5, 3), 77))
    assert tuple(np.asarray(load_image(one))[0, 0]) == (255, 255, 255)
    out = np.asarray(load_image(grey)).astype(int)
    assert out.shape == (3, 5, 3) and np.all(np.abs(out - 77) <= 2)


def test_one_by_one(tmp_path):
    path = save(tmp_path / "dot.webp", Image.new("RGB", (1, 1), (1, 2, 3)))
    im = load_image(path, max_side=1)
    assert im.size == (1, 1) and im.mode == "RGB"


def test_result_is_fully_decoded_and_independent_of_file(tmp_path):
    path = save(tmp_path / "a.jpg", Image.fromarray(noise(10, 10)))
    im = load_image(path)
    path.unlink()
    assert np.asarray(im).shape == (10, 10, 3)


# ----------------------------------------------------------------------------- bad files


def test_truncated_jpeg_is_an_error(tmp_path):
    good = save(tmp_path / "good.jpg", Image.fromarray(noise(200, 300)))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageLoadError) as err:
        load_image(bad)
    assert err.value.path == bad
    assert str(bad) in str(err.value)
    assert err.value.reason == "truncated"
    with pytest.raises(ImageLoadError):  # also through the draft (reduced-size) decode path
        load_image(bad, max_side=50)


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("random.jpg", np.random.default_rng(1).bytes(5000), "not an image"),
        ("empty.png", b"", "empty file"),
        ("text.png", b"hello, I am not a picture\n", "not an image"),
    ],
)
def test_non_images_are_errors(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageLoadError) as err:
        load_image(path)
    assert err.value.reason == reason
    assert str(err.value) == f"{path}: {reason}"


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageLoadError, match="folder"):
        load_image(tmp_path)


def test_error_is_picklable():
    err = pickle.loads(pickle.dumps(ImageLoadError("a/b.jpg", "truncated")))
    assert (err.path, err.reason, str(err)) == (Path("a/b.jpg"), "truncated", "a/b.jpg: truncated")


def test_bomb_header_refused_before_decoding(tmp_path):
    # 200k x 200k claimed by a 57-byte file: Pillow's own hard limit would trip too.
    path = png_header_only(tmp_path / "bomb.png", 200_000, 200_000)
    with pytest.raises(ImageLoadError, match="image too large"):
        load_image(path)
    # Just over our limit, under Pillow's hard one: refused with the size in the message.
    path = png_header_only(tmp_path / "big.png", 10_001, 10_000)
    with pytest.raises(ImageLoadError, match=r"image too large: 10001x10000 pixels > 100000000"):
        load_image(path)


def test_real_image_over_small_limit(tmp_path):
    path = save(tmp_path / "dot.png", Image.new("RGB", (1, 1)))
    with pytest.raises(ImageLoadError, match="1x1 pixels > 0"):
        load_image(path, max_pixels=0)
    path = save(tmp_path / "blank.png", Image.new("L", (2000, 1000)))
    with pytest.raises(ImageLoadError, match="2000x1000"):
        load_image(path, max_pixels=1_000_000)


def test_no_pillow_bomb_warning_under_our_limit(tmp_path):
    # Above Pillow's default warning threshold (~89.5 Mpx) but under ours: header-only file,
    # so the check must happen in Image.open; stop at the (expected) truncation error.
    path = png_header_only(tmp_path / "big.png", 9_500, 10_000)
    assert 9_500 * 10_000 > Image.MAX_IMAGE_PIXELS
    assert 9_500 * 10_000 < DEFAULT_MAX_PIXELS
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageLoadError) as err:
            load_image(path)
        assert err.value.reason == "truncated"  # a warning-turned-error would read differently
        # A caller may raise our limit beyond Pillow's hard error (2x its threshold).
        path = png_header_only(tmp_path / "huge.png", 20_000, 10_000)
        assert 20_000 * 10_000 > 2 * Image.MAX_IMAGE_PIXELS
        with pytest.raises(ImageLoadError) as err:
            load_image(path, max_pixels=300_000_000)
        assert err.value.reason == "truncated"
    assert Image.MAX_IMAGE_PIXELS == before  # not changed globally


def test_max_side_downsizes(tmp_path):
    big = Image.fromarray(np.zeros((2000, 3000, 3), dtype=np.uint8))
    for name in ("big.jpg", "big.png"):
        path = save(tmp_path / name, big)
        assert load_image(path, max_side=300).size == (300, 200)
        assert load_image(path, max_side=5000).size == (3000, 2000)
    with pytest.raises(ValueError):
        load_image(tmp_path / "big.png", max_side=0)


# ----------------------------------------------------------------------------- batches


def test_load_images_skips_and_reports(tmp_path, caplog):
    good = save(tmp_path / "good.jpg", Image.fromarray(noise(8, 8)))
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    missing = tmp_path / "missing.jpg"
    report = SkipReport()
    with caplog.at_level(logging.WARNING, logger="pair_vit.data"):
        out = list(load_images([good, bad, missing], report))
    assert [p for p, _ in out] == [good]
    assert out[0][1].mode == "RGB"
    assert list(report) == [(bad, "not an image"), (missing, "file not found")]
    assert len(report) == 2
    assert str(bad) in caplog.text and "not an image" in caplog.text
    assert str(missing) in caplog.text
    assert report.summary() == "2 images skipped: bad.png (not an image), missing.jpg (file not found)"


def test_skip_report_lists_an_image_once_with_its_first_reason():
    report = SkipReport()
    report.add("q/bad.jpg", "not an image")
    report.add(Path("q/bad.jpg"), "truncated")  # a second stage decoding the same query
    report.entries.append((Path("q/other.jpg"), "file not found"))  # gathered from another process
    report.add("q/other.jpg", "file not found")
    report.add("q/third.jpg", "truncated")
    assert list(report) == [(Path("q/bad.jpg"), "not an image"), (Path("q/other.jpg"), "file not found"),
                            (Path("q/third.jpg"), "truncated")]


def test_load_images_passes_kwargs(tmp_path):
    path = save(tmp_path / "a.png", Image.new("RGB", (40, 20)))
    [(_, im)] = load_images([path], SkipReport(), max_side=10)
    assert im.size == (10, 5)


def test_skip_report_summary_and_csv(tmp_path):
    report = SkipReport()
    assert report.summary() == "0 images skipped"
    report.add("x/one.jpg", "truncated")
    assert report.summary() == "1 image skipped: one.jpg (truncated)"
    for i in range(20):
        report.add(f"x/{i}.jpg", "not an image")
    summary = report.summary()
    assert summary.startswith("21 images skipped: one.jpg (truncated), 0.jpg")
    assert summary.endswith("and 16 more") and "19.jpg" not in summary
    out = tmp_path / "out" / "skipped.csv"
    report.write_csv(out)
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 21 and rows[0] == {"path": "x/one.jpg", "reason": "truncated"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["skipped.csv"]  # no temp left


# ----------------------------------------------------------------------------- folders


def test_list_images_nested_case_and_filters(tmp_path):
    img = Image.new("RGB", (2, 2))
    save(tmp_path / "b.JPG", img)
    save(tmp_path / "sub" / "deeper" / "a.png", img)
    save(tmp_path / "sub" / "c'quote.JpEg", img)
    save(tmp_path / ".hidden.jpg", img)
    save(tmp_path / ".cache" / "d.jpg", img)
    (tmp_path / "manifest.csv").write_text("file\n")
    (tmp_path / "notes.txt").write_text("x")
    found = list_images(tmp_path)
    assert list(found) == ["a", "b", "c'quote"]
    assert found["a"] == tmp_path / "sub" / "deeper" / "a.png"
    assert list(list_images(tmp_path, recursive=False)) == ["b"]


@pytest.mark.parametrize("first, second", [("a.jpg", "a.png"), ("sub1/a.jpg", "sub2/a.jpg")])
def test_list_images_duplicate_stems(tmp_path, first, second):
    for rel in (first, second):
        save(tmp_path / rel, Image.new("RGB", (1, 1)))
    with pytest.raises(DuplicateIdError) as err:
        list_images(tmp_path)
    assert str(tmp_path / first) in str(err.value) and str(tmp_path / second) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_list_images_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- ground truth


def test_read_ground_truth(tmp_path):
    path = tmp_path / "gt.csv"
    path.write_text(
        "query_id,reference_id\nQ000123,R000001\nQ000124,\nQ000125,R000002\nQ000123,R000001\nNA,R000003\n"
    )
    df = read_ground_truth(path)
    assert list(df.columns) == ["query_id", "reference_id"]
    assert df.values.tolist() == [["Q000123", "R000001"], ["Q000125", "R000002"], ["NA", "R000003"]]
    assert list(df.index) == [0, 1, 2]


def test_read_ground_truth_numeric_ids_stay_strings(tmp_path):
    path = tmp_path / "gt.csv"
    path.write_text("query_id,reference_id\n000123,007\n")
    assert read_ground_truth(path).values.tolist() == [["000123", "007"]]


@pytest.mark.parametrize("text", ["Q1,R1\nQ2,R2\n", "query,reference_id\nQ1,R1\n", ""])
def test_read_ground_truth_bad_header(tmp_path, text):
    path = tmp_path / "gt.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match="gt.csv"):
        read_ground_truth(path)


# ----------------------------------------------------------------------------- layout


def test_disc_layout_from_root(tmp_path):
    img = Image.new("RGB", (2, 2))
    save(tmp_path / "queries" / "Q1.jpg", img)
    save(tmp_path / "references" / "R1.jpg", img)
    save(tmp_path / "references" / "R2.jpg", img)
    layout = DiscLayout.from_root(tmp_path)
    assert layout.ground_truth is None and layout.train is None
    assert list(layout.query_images()) == ["Q1"]
    assert list(layout.reference_images()) == ["R1", "R2"]
    gt = layout.load_ground_truth()
    assert list(gt.columns) == ["query_id", "reference_id"] and len(gt) == 0

    (tmp_path / "ground_truth.csv").write_text("query_id,reference_id\nQ1,R2\n")
    (tmp_path / "train").mkdir()
    layout = DiscLayout.from_root(tmp_path)
    assert layout.train == tmp_path / "train"
    assert layout.load_ground_truth().values.tolist() == [["Q1", "R2"]]


def test_disc_layout_missing_parts(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        DiscLayout.from_root(tmp_path / "nothing")
    (tmp_path / "queries").mkdir()
    with pytest.raises(FileNotFoundError, match="references"):
        DiscLayout.from_root(tmp_path)


# ----------------------------------------------------------------------------- split


def test_split_of_deterministic_and_fraction():
    ids = [f"T{i:06d}" for i in range(4000)]
    splits = [split_of(i) for i in ids]
    assert splits == [split_of(i) for i in ids]
    assert set(splits) == {"train", "dev"}
    assert 0.22 < splits.count("dev") / len(ids) < 0.28
    assert splits != [split_of(i, seed=1) for i in ids]
    assert all(split_of(i, dev_fraction=0.0) == "train" for i in ids[:100])
    assert all(split_of(i, dev_fraction=1.0) == "dev" for i in ids[:100])


def test_split_images():
    images = {f"id{i}": Path(f"{i}.jpg") for i in range(200)}
    train, dev = split_images(images, "train"), split_images(images, "dev")
    assert not set(train) & set(dev) and set(train) | set(dev) == set(images)
    assert split_images(images, "all") == images
    # An image's split does not depend on which other images exist.
    assert split_images(dict(list(images.items())[:50]), "dev") == {
        k: v for k, v in dev.items() if k in list(images)[:50]
    }
    with pytest.raises(ValueError, match="validation"):
        split_images(images, "validation")
