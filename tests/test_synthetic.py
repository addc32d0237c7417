import json

import numpy as np
import pytest
from PIL import Image

from ugatit import synthetic
from ugatit.synthetic import (
    classify_domain,
    domain_score,
    evaluate_translation,
    load_mask,
    make_sample,
    mask_iou,
    shape_mask,
    write_dataset,
)


def samples(domain, n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [make_sample(domain, rng, size) for _ in range(n)]


@pytest.fixture(scope="module")
def real():
    return {d: samples(d, 200, seed=7) for d in "AB"}


def test_make_sample_is_deterministic_per_seed():
    for domain in "AB":
        (a, ma), (b, mb) = samples(domain, 1, seed=3)[0], samples(domain, 1, seed=3)[0]
        assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(ma, mb)
        (c, _), (d, _) = samples(domain, 2, seed=3)
        assert not np.array_equal(np.asarray(c), np.asarray(d))
        (e, _) = samples(domain, 1, seed=4)[0]
        assert not np.array_equal(np.asarray(a), np.asarray(e))


def test_sample_format_and_shape_size(real):
    for domain in "AB":
        for image, mask in real[domain][:50]:
            assert image.mode == "RGB" and image.size == (64, 64)
            assert mask.dtype == bool and mask.shape == (64, 64)
            area = mask.mean()
            # Circumscribed diameter 30-60%: a 30% triangle covers ~2.9%, a 60% disc ~28%.
            assert 0.025 <= area <= 0.29
            assert not mask[:3].any() and not mask[-3:].any() and not mask[:, :3].any() and not mask[:, -3:].any()


def test_domain_style_statistics(real):
    for image, mask in real["A"][:50]:
        rgb = np.asarray(image).astype(float)
        assert rgb[~mask].mean() > 200  # light background
        r, g, b = rgb[mask].mean(axis=0)
        assert r > g >= b and r > 150  # warm: red dominates, blue weakest
        assert len(np.unique(rgb[mask], axis=0)) == 1  # plain fill
    for image, mask in real["B"][:50]:
        rgb = np.asarray(image).astype(float)
        assert rgb[~mask].mean() < 60  # dark background
        r, g, b = rgb[mask].mean(axis=0)
        assert max(g, b) > r + 40  # cool
        assert len(np.unique(rgb[mask], axis=0)) == 2  # two-shade texture


def test_make_sample_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        make_sample("C", rng, 64)
    with pytest.raises(ValueError):
        make_sample("A", rng, 8)


def test_classifier_accuracy_on_real_samples(real):
    accuracy_a = np.mean([classify_domain(image) == "A" for image, _ in real["A"]])
    accuracy_b = np.mean([classify_domain(image) == "B" for image, _ in real["B"]])
    assert accuracy_a >= 0.95 and accuracy_b >= 0.95
    scores = [domain_score(image) for image, _ in real["A"][:20] + real["B"][:20]]
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_classifier_accepts_uint8_arrays(real):
    image, _ = real["B"][0]
    assert domain_score(np.asarray(image)) == pytest.approx(domain_score(image))
    with pytest.raises(ValueError):
        domain_score(np.zeros((8, 8)))


def test_shape_mask_recovers_true_mask(real):
    for domain in "AB":
        ious = [mask_iou(mask, shape_mask(image, domain)) for image, mask in real[domain]]
        assert np.mean(ious) >= 0.9, domain


def test_shape_mask_on_small_images():
    for domain in "AB":
        ious = [mask_iou(m, shape_mask(im, domain)) for im, m in samples(domain, 30, size=32)]
        assert np.mean(ious) >= 0.9, domain


def test_shape_mask_survives_texture_holes():
    # A B image whose dark texture shade collapsed onto the background: the mask stays solid.
    image, mask = samples("B", 1, seed=11)[0]
    rgb = np.asarray(image).copy()
    stripes = (np.indices(mask.shape).sum(axis=0) % 3 == 0) & mask
    rgb[stripes] = rgb[0, 0]
    assert mask_iou(mask, shape_mask(rgb, "B")) > 0.95
    assert mask_iou(mask, shape_mask(rgb, "A")) < mask_iou(mask, shape_mask(rgb, "B"))


def test_mask_iou_values():
    a = np.zeros((4, 4), bool)
    b = a.copy()
    a[:2] = True
    b[1:3] = True
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, ~a) == 0.0
    assert mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0


def test_identity_translation_keeps_style_and_content(real):
    inputs = [image for image, _ in real["A"][:30]]
    masks = [mask for _, mask in real["A"][:30]]
    result = evaluate_translation(inputs, inputs, "A", "B", input_masks=masks)
    assert result["n"] == 30
    assert result["target_domain_rate"] == 0.0
    assert result["mean_iou"] > 0.99


def naive_a_to_b(image):
    """Invert brightness: white background -> black, warm (R high, B low) -> cool."""
    return Image.fromarray(255 - np.asarray(image))


def channel_swap_a_to_b(image, mask):
    """Dark background, warm fill with red and blue exchanged."""
    rgb = np.asarray(image)
    return np.where(mask[..., None], rgb[..., ::-1], np.uint8(20))


def test_naive_colour_swap_is_judged_b_and_keeps_shape(real):
    inputs = [image for image, _ in real["A"][:40]]
    masks = [mask for _, mask in real["A"][:40]]
    inverted = evaluate_translation(inputs, [naive_a_to_b(x) for x in inputs], "A", "B")
    assert inverted["target_domain_rate"] >= 0.95 and inverted["mean_iou"] > 0.95
    swapped = [channel_swap_a_to_b(x, m) for x, m in zip(inputs, masks, strict=True)]
    result = evaluate_translation(inputs, swapped, "A", "B", input_masks=masks)
    assert result["target_domain_rate"] >= 0.95 and result["mean_iou"] > 0.95
    # And back: B inverted looks like A.
    b_inputs = [image for image, _ in real["B"][:40]]
    assert evaluate_translation(b_inputs, [naive_a_to_b(x) for x in b_inputs], "B", "A")["target_domain_rate"] >= 0.95


def test_blank_and_wrong_outputs_score_low(real):
    inputs = [image for image, _ in real["A"][:20]]
    masks = [mask for _, mask in real["A"][:20]]
    blank = [Image.new("RGB", (64, 64), (15, 15, 20))] * 20
    result = evaluate_translation(inputs, blank, "A", "B", input_masks=masks)
    assert result["mean_iou"] == 0.0
    assert result["target_domain_rate"] == 1.0  # a dark blank looks like B's background; IoU catches it
    # The right style with the wrong content: shapes of other B images.
    others = [image for image, _ in real["B"][:20]]
    result = evaluate_translation(inputs, others, "A", "B", input_masks=masks)
    assert result["target_domain_rate"] == 1.0 and result["mean_iou"] < 0.5


def test_classifier_decision_rule():
    size = 64
    mask = np.zeros((size, size), bool)
    mask[16:48, 16:48] = True

    def image(background, foreground):
        return np.where(mask[..., None], np.uint8(foreground), np.uint8(background)).astype(np.uint8)

    assert classify_domain(image((240, 240, 240), (230, 60, 20))) == "A"
    assert classify_domain(image((20, 20, 25), (20, 200, 230))) == "B"
    # One cue alone decides when the other is neutral (mid-grey background / grey shape).
    assert classify_domain(image((128, 128, 128), (20, 200, 230))) == "B"
    assert classify_domain(image((128, 128, 128), (230, 60, 20))) == "A"
    assert classify_domain(image((20, 20, 20), (200, 200, 200))) == "B"
    assert classify_domain(image((235, 235, 235), (60, 60, 60))) == "A"
    # Blurry, washed-out output of a B generator: dark-grey border, muted cyan blob.
    assert classify_domain(image((70, 72, 75), (90, 140, 150))) == "B"


def test_evaluate_translation_validates_lengths(real):
    image = real["A"][0][0]
    with pytest.raises(ValueError):
        evaluate_translation([image], [], "A", "B")
    with pytest.raises(ValueError):
        evaluate_translation([image], [image], "A", "B", input_masks=[])


def test_write_dataset_layout_and_determinism(tmp_path):
    root = write_dataset(tmp_path / "data", size=32, n_train=5, n_test=3, seed=1)
    counts = {d: len(list((root / d).glob("*.png"))) for d in ("trainA", "trainB", "testA", "testB")}
    assert counts == {"trainA": 5, "trainB": 5, "testA": 3, "testB": 3}
    assert sorted(p.name for p in (root / "masks" / "testB").glob("*.png")) == [
        "0000.png",
        "0001.png",
        "0002.png",
    ]
    assert not (root / "masks" / "trainA").exists()
    marker = json.loads((root / synthetic.MARKER).read_text())
    assert marker["size"] == 32 and marker["seed"] == 1
    with Image.open(root / "testB" / "0001.png") as im:
        test_image = np.asarray(im.convert("RGB"))
    assert test_image.shape == (32, 32, 3)
    mask = load_mask(root / "masks" / "testB" / "0001.png")
    assert mask_iou(mask, shape_mask(test_image, "B")) > 0.9
    with Image.open(root / "trainA" / "0000.png") as a, Image.open(root / "testA" / "0000.png") as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))  # train and test are different streams

    other = write_dataset(tmp_path / "copy", size=32, n_train=5, n_test=3, seed=1)
    for path in sorted(root.rglob("*.png")):
        assert path.read_bytes() == (other / path.relative_to(root)).read_bytes()
    assert not list(tmp_path.glob(".*"))  # no temporary directory left behind


def test_write_dataset_reuses_matching_and_refuses_mismatch(tmp_path):
    root = write_dataset(tmp_path / "data", size=32, n_train=2, n_test=1, seed=0)
    stamp = (root / "trainA" / "0000.png").stat().st_mtime_ns
    assert write_dataset(root, size=32, n_train=2, n_test=1, seed=0) == root
    assert (root / "trainA" / "0000.png").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError):
        write_dataset(root, size=32, n_train=2, n_test=1, seed=1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "photo.jpg").write_bytes(b"not ours")
    with pytest.raises(FileExistsError):
        write_dataset(foreign, size=32, n_train=2, n_test=1)
    assert [p.name for p in foreign.iterdir()] == ["photo.jpg"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (write_dataset(empty, size=32, n_train=1, n_test=1) / "trainB" / "0000.png").is_file()
