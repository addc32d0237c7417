import random
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ugatit.data import (
    BadImageError,
    DataError,
    EpochSampler,
    UnpairedImageDataset,
    eval_transform,
    format_report,
    infinite_batches,
    list_images,
    load_rgb,
    make_loader,
    scan_dataset,
    scan_folder,
    to_image,
    to_tensor,
    train_transform,
)


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def save(img: Image.Image, path: Path, fmt: str = "PNG", **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(int)


# ---------------------------------------------------------------------------------------------- loading


def test_png_named_jpg_and_no_extension_load(tmp_path):
    img = noise(20, 10)
    for name in ["really_png.jpg", "no_extension"]:
        out = load_rgb(save(img, tmp_path / name))
        assert out.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(out), np.asarray(img))


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 8, 8))  # red top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    out = load_rgb(save(img, tmp_path / "rot.jpg", "JPEG", quality=95, exif=exif))
    assert out.size == (20, 40)
    top_right, top_left = pixels(out)[2, -3], pixels(out)[2, 2]
    assert top_right[0] > 200 and top_right[2] < 60  # red moved to the top-right
    assert top_left[2] > 200 and top_left[0] < 60


def _palette(transparent: bool) -> Image.Image:
    img = Image.new("P", (2, 1), 0)
    img.putpalette([10, 20, 30, 200, 100, 50])
    img.putpixel((1, 0), 1)
    if transparent:
        img.info["transparency"] = 0
    return img


def _pair(mode: str, a, b) -> Image.Image:
    img = Image.new(mode, (2, 1), a)
    img.putpixel((1, 0), b)
    return img


@pytest.mark.parametrize(
    "img, fmt, expected",
    [
        (_pair("L", 0, 77), "PNG", [(0, 0, 0), (77, 77, 77)]),
        (_pair("1", 0, 1), "PNG", [(0, 0, 0), (255, 255, 255)]),
        (_pair("LA", (100, 0), (100, 255)), "PNG", [(255, 255, 255), (100, 100, 100)]),
        (_pair("RGBA", (10, 20, 30, 0), (10, 20, 30, 255)), "PNG", [(255, 255, 255), (10, 20, 30)]),
        (_pair("RGBA", (0, 0, 0, 128), (0, 0, 0, 255)), "PNG", [(127, 127, 127), (0, 0, 0)]),
        (_palette(transparent=False), "PNG", [(10, 20, 30), (200, 100, 50)]),
        (_palette(transparent=True), "PNG", [(255, 255, 255), (200, 100, 50)]),
        (_pair("CMYK", (0, 255, 255, 0), (0, 0, 0, 255)), "TIFF", [(255, 0, 0), (0, 0, 0)]),
        (Image.fromarray(np.array([[65535, 32768]], np.uint16)), "PNG", [(255, 255, 255), (128, 128, 128)]),
        (Image.fromarray(np.array([[65535, 0]], np.int32)), "TIFF", [(255, 255, 255), (0, 0, 0)]),
        (Image.fromarray(np.array([[300.0, 100.4]], np.float32)), "TIFF", [(255, 255, 255), (100, 100, 100)]),
    ],
    ids=["L", "1", "LA", "RGBA", "RGBA-half", "P", "P-transparent", "CMYK", "I;16", "I", "F"],
)
def test_modes_convert_to_rgb(tmp_path, img, fmt, expected):
    path = save(img, tmp_path / "img", fmt)
    assert Image.open(path).mode == img.mode  # the file really holds that mode
    out = load_rgb(path)
    assert out.mode == "RGB"
    np.testing.assert_allclose(pixels(out)[0], np.array(expected), atol=1)


def test_load_errors_name_file_and_reason(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadImageError, match="zero-byte file") as err:
        load_rgb(tmp_path / "empty.png")
    assert err.value.path == tmp_path / "empty.png"
    assert isinstance(err.value, ValueError)
    with pytest.raises(BadImageError, match="cannot read"):
        load_rgb(tmp_path / "missing.png")


# ---------------------------------------------------------------------------------------------- scanning


def test_list_images_recursive_sorted_skips_hidden(tmp_path):
    for rel in ["b.png", "a/z.png", "a/b/c.txt", ".hidden.png", ".git/x.png", "a/.DS_Store"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    rel = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert rel == ["a/b/c.txt", "a/z.png", "b.png"]


def test_scan_folder_reports_each_bad_file(tmp_path):
    good = noise(80, 70)
    save(good, tmp_path / "good.png")
    save(good, tmp_path / "sub" / "good2.jpg", "JPEG")
    for fmt in ["PNG", "JPEG"]:
        data = save(noise(200, 200), tmp_path / f"full.{fmt}", fmt).read_bytes()
        (tmp_path / f"full.{fmt}").unlink()
        (tmp_path / f"truncated.{fmt.lower()}").write_bytes(data[: len(data) // 2])
    data = bytearray(save(noise(100, 100), tmp_path / "corrupt.png").read_bytes())
    idat = data.find(b"IDAT")
    data[idat + 20 : idat + 400] = bytes(380)
    (tmp_path / "corrupt.png").write_bytes(bytes(data))
    (tmp_path / "random.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image\n")
    save(noise(20, 30), tmp_path / "small.png")

    report = scan_folder(tmp_path, min_size=64)
    assert [p.relative_to(tmp_path).as_posix() for p in report.good] == ["good.png", "sub/good2.jpg"]
    reasons = {p.name: r for p, r in report.bad}
    assert reasons["zero.png"] == "zero-byte file"
    assert reasons["notes.txt"] == "not an image (cannot identify image file)"
    assert reasons["random.jpg"] == "not an image (cannot identify image file)"
    assert reasons["small.png"] == "too small: 20x30 < 64 px on the shorter side"
    for name in ["truncated.png", "truncated.jpeg", "corrupt.png"]:
        assert reasons[name].startswith("truncated or corrupt: "), reasons[name]
    assert len(report.bad) == 7

    text = format_report({"trainA": report})
    assert text.splitlines()[0].startswith("trainA: 2 good, 7 bad")
    assert "small.png: too small: 20x30 < 64 px on the shorter side" in text


def _dataset(root: Path, counts: dict[str, int]) -> Path:
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            save(noise(32, 32, i), root / name / f"{i}.png")
    return root


def test_scan_dataset_ok(tmp_path):
    root = _dataset(tmp_path / "data", {"trainA": 3, "trainB": 2, "testA": 1})
    reports = scan_dataset(root, min_size=16)
    assert list(reports) == ["trainA", "trainB", "testA"]
    assert [len(r.good) for r in reports.values()] == [3, 2, 1]


@pytest.mark.parametrize(
    "counts, require_test, needle",
    [
        (None, False, "data"),
        ({"trainA": 2}, False, "trainB"),
        ({"trainA": 0, "trainB": 2}, False, "trainA has no usable images"),
        ({"trainA": 2, "trainB": 1}, False, "trainB has a single usable image"),
        ({"trainA": 2, "trainB": 2, "testB": 1}, True, "testA"),
        ({"trainA": 2, "trainB": 2, "testA": 1, "testB": 0}, True, "testB has no usable images"),
    ],
)
def test_scan_dataset_errors_name_the_folder(tmp_path, counts, require_test, needle):
    root = _dataset(tmp_path / "data", counts) if counts else tmp_path / "data"
    with pytest.raises(DataError, match=needle):
        scan_dataset(root, min_size=16, require_test=require_test)


def test_only_bad_files_count_as_empty(tmp_path):
    root = _dataset(tmp_path / "data", {"trainA": 2, "trainB": 0})
    (root / "trainB" / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match="1 unusable files") as err:
        scan_dataset(root, min_size=16)
    assert err.value.reports["trainB"].bad[0][1].startswith("not an image")


# ---------------------------------------------------------------------------------------------- transforms


def test_to_tensor_range_and_round_trip():
    img = noise(7, 5)
    x = to_tensor(img)
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32
    black_white = to_tensor(Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8)))
    assert black_white[:, 0, 0].tolist() == [-1, -1, -1] and black_white[:, 0, 1].tolist() == [1, 1, 1]
    np.testing.assert_array_equal(np.asarray(to_image(x)), np.asarray(img))
    assert to_image(torch.full((3, 2, 2), 5.0)).getpixel((0, 0)) == (255, 255, 255)


def _crops(big: np.ndarray, size: int) -> np.ndarray:
    return np.lib.stride_tricks.sliding_window_view(big, (size, size, 3)).reshape(-1, size, size, 3)


def test_train_transform_is_flip_resize_random_crop():
    img, size = noise(40, 25), 16
    resized = [np.asarray(im.resize((46, 46), Image.Resampling.BILINEAR)) for im in (img, img.transpose(0))]
    flips = set()
    for seed in range(12):
        x = train_transform(img, size, random.Random(seed))
        assert x.shape == (3, size, size) and x.min() >= -1 and x.max() <= 1
        out = np.asarray(to_image(x))
        matches = [bool((_crops(r, size) == out).all(axis=(1, 2, 3)).any()) for r in resized]
        assert sum(matches) == 1  # exactly a crop of the resized plain or flipped image
        flips.add(matches.index(True))
    assert flips == {0, 1}


def test_train_transform_seeded():
    img = noise(50, 40)
    same = [train_transform(img, 16, random.Random(7)) for _ in range(2)]
    assert torch.equal(same[0], same[1])
    outs = {train_transform(img, 16, random.Random(s)).numpy().tobytes() for s in range(5)}
    assert len(outs) > 1


def test_keep_aspect_shapes_and_center_crop():
    img = noise(64, 32)
    x = train_transform(img, 16, random.Random(0), keep_aspect=True)
    assert x.shape == (3, 16, 16)
    resized = np.asarray(img.resize((92, 46), Image.Resampling.BILINEAR))  # shorter side -> 16 + 30
    assert (_crops(resized, 16) == np.asarray(to_image(x))).all(axis=(1, 2, 3)).any()
    expected = img.resize((32, 16), Image.Resampling.BILINEAR).crop((8, 0, 24, 16))
    assert torch.equal(eval_transform(img, 16, keep_aspect=True), to_tensor(expected))


def test_no_augment_is_plain_resize(tmp_path):
    img = noise(50, 30)
    path = save(img, tmp_path / "a.png")
    ds = UnpairedImageDataset([path], 16, augment=False)
    expected = to_tensor(img.resize((16, 16), Image.Resampling.BILINEAR))
    assert torch.equal(ds[(0, 1)], expected) and torch.equal(ds[(0, 2)], expected)
    assert torch.equal(eval_transform(img, 16), expected)


# ---------------------------------------------------------------------------------------------- dataset


def test_cached_dataset_matches_uncached(tmp_path):
    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    paths = [
        save(noise(40, 30), tmp_path / "a.png"),
        save(rgba, tmp_path / "b.png"),
        save(noise(30, 60, 1), tmp_path / "c.jpg", "JPEG", exif=exif),
    ]
    for keep_aspect in (False, True):
        plain = UnpairedImageDataset(paths, 16, keep_aspect=keep_aspect)
        cached = UnpairedImageDataset(paths, 16, keep_aspect=keep_aspect, cache=True)
        assert not plain.cached and cached.cached and len(cached) == 3
        for item in [(0, 1), (1, 2), (2, 3), (2, 4)]:
            assert torch.equal(plain[item], cached[item])
    assert UnpairedImageDataset(paths, 16, cache="auto").cached


# ---------------------------------------------------------------------------------------------- sampling


def test_each_epoch_is_a_permutation():
    n = 50
    draws = [i for i, _ in islice(EpochSampler(n, seed=3), 3 * n)]
    epochs = [draws[e * n : (e + 1) * n] for e in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1] and epochs[0] != list(range(n))
    other = [i for i, _ in islice(EpochSampler(n, seed=4), n)]
    assert other != epochs[0]


@pytest.mark.parametrize("n", [10, 11])
def test_ranks_split_the_single_process_stream(n):
    """2 ranks x batch b see, step by step, exactly the samples of 1 process x batch 2b (indices and seeds)."""
    single = list(islice(EpochSampler(n, seed=0), 4 * n))
    ranks = [list(islice(EpochSampler(n, seed=0, rank=r, world_size=2), 2 * n)) for r in (0, 1)]
    assert [draw for pair in zip(*ranks, strict=True) for draw in pair] == single
    first_epoch = [i for i, _ in single[:n]]
    assert sorted(first_epoch) == list(range(n))


def test_start_resumes_exactly():
    fresh = list(islice(EpochSampler(7, seed=5, rank=1, world_size=2), 20))
    for k in (0, 3, 4, 9):
        resumed = EpochSampler(7, seed=5, rank=1, world_size=2, start=2 * k)
        assert list(islice(resumed, 20 - k)) == fresh[k:]


def test_resuming_with_another_world_size_continues_the_global_stream():
    single = list(islice(EpochSampler(9, seed=2), 30))
    ranks = [list(islice(EpochSampler(9, seed=2, rank=r, world_size=3, start=6), 8)) for r in range(3)]
    assert [draw for triple in zip(*ranks, strict=True) for draw in triple] == single[6:30]


def test_sample_seeds_unique_63_bit():
    seeds = [s for _, s in islice(EpochSampler(5, seed=1), 200)]
    assert len(set(seeds)) == 200 and all(0 <= s < 2**63 for s in seeds)


def test_more_ranks_than_images_raises():
    with pytest.raises(DataError, match="more ranks than images in trainA"):
        EpochSampler(3, seed=0, world_size=4, name="trainA")


# ---------------------------------------------------------------------------------------------- loaders


def test_loader_identical_across_num_workers_and_resume(tmp_path):
    paths = [save(noise(24, 20, i), tmp_path / f"{i}.png") for i in range(5)]
    dataset = UnpairedImageDataset(paths, 16)

    def batches(num_workers: int, start: int = 0, count: int = 5) -> list[torch.Tensor]:
        it = iter(make_loader(dataset, EpochSampler(5, seed=9, start=start), 3, num_workers))
        return [next(it) for _ in range(count)]

    rng_state = torch.get_rng_state()
    serial = batches(0)
    assert torch.equal(rng_state, torch.get_rng_state())  # global RNG untouched
    assert serial[0].shape == (3, 3, 16, 16)
    parallel = batches(2)
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(serial[2:], batches(0, start=6, count=3), strict=True))
    it = infinite_batches(paths, 16, 3, seed=9, cache=False)
    assert all(torch.equal(next(it), b) for b in serial)


def test_crop_margin_sets_the_zoom_of_the_augmentation():
    """margin 0: the random crop is the whole resized image, so the result is the plain or flipped resize."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    plain = eval_transform(img, 32)
    flipped = eval_transform(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), 32)
    for seed in range(6):
        out = train_transform(img, 32, random.Random(seed), margin=0)
        assert torch.equal(out, plain) or torch.equal(out, flipped)
    zoomed = train_transform(img, 32, random.Random(0), margin=30)
    assert not (torch.equal(zoomed, plain) or torch.equal(zoomed, flipped))
