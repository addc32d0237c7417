import colorsys

import numpy as np
import pytest
import torch
from PIL import Image

from ugatit.visualize import (
    heatmap_to_rgb,
    jet_colormap,
    make_grid,
    overlay_heatmap,
    sample_column,
    save_image,
)


def test_jet_endpoints_and_middle():
    lo, mid, hi = jet_colormap(np.array([0.0, 0.5, 1.0])).astype(int)
    assert lo.tolist() == [0, 0, 128]  # dark blue
    assert hi.tolist() == [128, 0, 0]  # dark red
    assert mid[1] == 255 and mid[0] < 160 and mid[2] < 160  # green dominates
    assert jet_colormap(np.array(0.25)).tolist() == [0, 128, 255]  # blue -> cyan half way
    assert jet_colormap(np.array(0.75)).tolist() == [255, 128, 0]  # yellow -> red half way


def test_jet_hue_runs_monotonically_from_blue_to_red():
    colours = jet_colormap(np.linspace(0.0, 1.0, 101)) / 255.0
    hues = np.array([colorsys.rgb_to_hsv(*c)[0] for c in colours])
    assert hues[0] == pytest.approx(2 / 3) and hues[-1] == pytest.approx(0.0)
    assert np.all(np.diff(hues) <= 1e-9)
    assert hues[0] - hues[-1] > 0.6


def test_jet_shape_dtype_clipping_and_nan():
    x = np.array([[-1.0, np.nan], [2.0, 0.3]])
    out = jet_colormap(x)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == out[0, 1].tolist() == jet_colormap(np.array(0.0)).tolist()
    assert out[1, 0].tolist() == jet_colormap(np.array(1.0)).tolist()


def test_heatmap_to_rgb_shape_range_and_normalisation():
    heatmap = torch.tensor([[[0.0, 10.0], [20.0, 30.0]]])
    rgb = heatmap_to_rgb(heatmap, 8)
    assert rgb.shape == (3, 8, 8) and rgb.dtype == torch.float32
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    # Min-max normalised: the corners are the coldest and hottest jet colours.
    assert torch.allclose(rgb[:, 0, 0], torch.tensor([0.0, 0.0, 128 / 255]))
    assert torch.allclose(rgb[:, -1, -1], torch.tensor([128 / 255, 0.0, 0.0]))
    # Scale and offset of the raw map do not matter; hxw works like 1xhxw.
    assert torch.equal(heatmap_to_rgb(heatmap[0] * 7 - 3, (8, 8)), rgb)
    assert heatmap_to_rgb(heatmap, (4, 6)).shape == (3, 4, 6)


def test_heatmap_to_rgb_resizes_bilinearly():
    heatmap = torch.tensor([[0.0, 1.0]])
    rgb = heatmap_to_rgb(heatmap, (1, 4))
    # align_corners=False: outer pixels copy the ends, inner ones are at 1/4 and 3/4.
    expected = jet_colormap(np.array([0.0, 0.25, 0.75, 1.0]))
    assert torch.allclose(rgb[:, 0, :].T * 255, torch.from_numpy(expected).float())


@pytest.mark.parametrize("value", [0.0, 5.0, -1e30, float("nan"), float("inf")])
def test_constant_or_broken_heatmap_gives_zero_colour(value):
    rgb = heatmap_to_rgb(torch.full((1, 4, 4), value), 16)
    assert torch.isfinite(rgb).all()
    zero = torch.from_numpy(jet_colormap(np.array(0.0))).float() / 255
    assert torch.equal(rgb, zero[:, None, None].expand(3, 16, 16))


def test_heatmap_to_rgb_rejects_bad_shape():
    with pytest.raises(ValueError):
        heatmap_to_rgb(torch.zeros(2, 4, 4), 8)


def images(seed=0, h=8, w=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) * 2 - 1 for _ in range(4)]


def heatmaps(seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    return [torch.rand(1, 3, 3, generator=g) for _ in range(3)]


def test_sample_column_order_and_shape():
    real, identity, fake, cycle = images()
    id_hm, fake_hm, cycle_hm = heatmaps()
    column = sample_column(real, identity, id_hm, fake, fake_hm, cycle, cycle_hm)
    h, w = 8, 6
    assert column.shape == (3, 7 * h, w)
    expected = [
        (real + 1) / 2,
        heatmap_to_rgb(id_hm, (h, w)),
        (identity + 1) / 2,
        heatmap_to_rgb(fake_hm, (h, w)),
        (fake + 1) / 2,
        heatmap_to_rgb(cycle_hm, (h, w)),
        (cycle + 1) / 2,
    ]
    for k, tile in enumerate(expected):
        assert torch.allclose(column[:, k * h : (k + 1) * h], tile), k


def test_sample_column_clamps_images_to_unit_range():
    real, identity, fake, cycle = (x * 3 for x in images(1))
    column = sample_column(real, identity, *heatmaps()[:1], fake, *heatmaps()[1:2], cycle, heatmaps()[2])
    assert column.min() >= 0.0 and column.max() <= 1.0


def test_overlay_is_a_real_blend():
    image = torch.zeros(3, 16, 16)  # mid-grey in [-1, 1]
    heatmap = torch.arange(16.0).reshape(1, 4, 4)
    out = overlay_heatmap(image, heatmap, alpha=0.5)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (16, 16)
    blended = np.asarray(out).astype(int)
    plain = np.full((16, 16, 3), 128)
    colour = (heatmap_to_rgb(heatmap, 16).permute(1, 2, 0).numpy() * 255).round().astype(int)
    assert np.abs(blended - plain).max() > 30
    assert np.abs(blended - colour).max() > 30
    assert np.abs(blended - (plain + colour) / 2).max() <= 1.0
    # alpha picks the end points.
    assert np.abs(np.asarray(overlay_heatmap(image, heatmap, alpha=0.0)).astype(int) - plain).max() <= 1
    assert np.array_equal(np.asarray(overlay_heatmap(image, heatmap, alpha=1.0)), colour)


def test_overlay_accepts_pil_images():
    pil = Image.new("RGB", (10, 12), (200, 40, 40))
    out = overlay_heatmap(pil, torch.rand(5, 5), alpha=0.3)
    assert out.size == (10, 12)
    assert not np.array_equal(np.asarray(out), np.asarray(pil))


def test_make_grid_places_columns_side_by_side():
    columns = [torch.full((3, 14, 5), v) for v in (0.0, 0.5, 1.0)]
    grid = make_grid(columns)
    assert grid.mode == "RGB" and grid.size == (15, 14)
    array = np.asarray(grid)
    assert array.dtype == np.uint8
    assert array[:, :5].max() == 0 and (array[:, 5:10] == 128).all() and array[:, 10:].min() == 255
    with pytest.raises(ValueError):
        make_grid([])


def test_save_image_writes_atomically(tmp_path):
    tensor = torch.rand(3, 7, 9)
    path = tmp_path / "sub" / "grid.png"
    save_image(tensor, path)
    with Image.open(path) as im:
        saved = np.asarray(im)
    assert saved.shape == (7, 9, 3)
    assert np.array_equal(saved, (tensor.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    # Overwrite in place with a PIL image; no temporary files remain.
    save_image(Image.new("RGB", (4, 4), (1, 2, 3)), path)
    with Image.open(path) as im:
        assert im.size == (4, 4) and im.getpixel((0, 0)) == (1, 2, 3)
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]


def test_save_image_failure_keeps_old_file(tmp_path):
    path = tmp_path / "out.png"
    save_image(Image.new("RGB", (2, 2), (9, 9, 9)), path)
    with pytest.raises(OSError):  # PNG cannot hold CMYK: the write fails half way
        save_image(Image.new("CMYK", (2, 2)), path)
    with Image.open(path) as im:
        assert im.getpixel((0, 0)) == (9, 9, 9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
