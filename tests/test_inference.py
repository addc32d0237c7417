"""Inference: the Translator against a direct generator forward, and translate_files' naming and refusals."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ugatit.checkpoint import CheckpointError, load_model, save_model
from ugatit.config import Config
from ugatit.data import BadImageError, eval_transform, load_rgb, to_image
from ugatit.inference import Translator, default_batch_size, plan_outputs, translate_files
from ugatit.models import build_generator, build_networks

TINY = {"img_size": 32, "ch": 4, "n_res": 1, "light": True, "global_layers": 4, "local_layers": 3}


def random_image(width: int, height: int, seed: int) -> Image.Image:
    """Smooth noise: structure at several scales, so resizing and attention have something to work on."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((width, height))
    fine = rng.integers(-40, 41, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.int64) + fine, 0, 255).astype(np.uint8))


def save_checkpoint(path: Path, networks: tuple[str, ...] | None = None, **overrides) -> Path:
    config = Config(**TINY, **overrides)
    torch.manual_seed(0)
    nets = build_networks(config)
    states = {name: net.state_dict() for name, net in nets.items() if networks is None or name in networks}
    save_model(path, states, config)
    return path


def direct(checkpoint: Path, name: str, image: Image.Image) -> Image.Image:
    """The reference: the stored generator run by hand on the official test transform."""
    config, states = load_model(checkpoint, [name])
    generator = build_generator(config)
    generator.load_state_dict(states[name])
    generator.eval()
    with torch.no_grad():
        out = generator(eval_transform(image, config.img_size, config.keep_aspect)[None])[0]
    return to_image(out[0])


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def assert_same_up_to_rounding(a: Image.Image, b: Image.Image) -> None:
    """Batched CPU convolutions (oneDNN) differ from unbatched ones in the last float bits (~1e-6); after rounding to
    8 bits that can move a rare pixel by one level, never more."""
    diff = np.abs(pixels(a) - pixels(b))
    assert a.size == b.size and diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "full.safetensors")


@pytest.fixture(scope="module")
def translator(checkpoint) -> Translator:
    return Translator.from_checkpoint(checkpoint, "A2B")


def write_images(paths: list[Path], size: tuple[int, int] = (50, 40)) -> None:
    for seed, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        random_image(*size, seed=seed).save(path)


def tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


# ----------------------------------------------------------------------------------------------
# Translator


def test_output_at_img_size_or_back_at_original_size(translator):
    image = random_image(50, 40, seed=1)
    out = translator(image)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (32, 32)
    restored = translator(image, original_size=True)
    assert restored.size == (50, 40)
    assert np.array_equal(pixels(restored), pixels(out.resize((50, 40), Image.Resampling.BICUBIC)))
    many = translator([image, random_image(30, 70, seed=2)], original_size=True)
    assert [im.size for im in many] == [(50, 40), (30, 70)]


@pytest.mark.parametrize("keep_aspect", [False, True])
def test_matches_direct_generator_forward(tmp_path, keep_aspect):
    ckpt = save_checkpoint(tmp_path / "model.safetensors", keep_aspect=keep_aspect)
    image = random_image(50, 40, seed=3)
    out = Translator.from_checkpoint(ckpt)(image)
    assert np.array_equal(pixels(out), pixels(direct(ckpt, "genA2B", image)))


def test_b2a_uses_genB2A(checkpoint, translator):
    image = random_image(40, 40, seed=4)
    b2a = Translator.from_checkpoint(checkpoint, direction="B2A")
    assert b2a.direction == "B2A"
    out = b2a(image)
    assert np.array_equal(pixels(out), pixels(direct(checkpoint, "genB2A", image)))
    assert not np.array_equal(pixels(out), pixels(translator(image)))


def test_generator_only_checkpoint_and_run_folder(tmp_path):
    ckpt = save_checkpoint(tmp_path / "run" / "model.safetensors", networks=("genA2B",))
    image = random_image(36, 44, seed=5)
    expected = pixels(direct(ckpt, "genA2B", image))
    assert np.array_equal(pixels(Translator.from_checkpoint(ckpt, "A2B")(image)), expected)
    assert np.array_equal(pixels(Translator.from_checkpoint(tmp_path / "run", "A2B")(image)), expected)
    with pytest.raises(CheckpointError, match="genB2A"):
        Translator.from_checkpoint(ckpt, "B2A")
    with pytest.raises(ValueError, match="direction"):
        Translator.from_checkpoint(ckpt, "AB")


def test_heatmap_is_an_overlay_on_the_model_input(translator):
    image = random_image(50, 40, seed=6)
    [(out, overlay)] = translator.translate_with_heatmap([image])
    assert np.array_equal(pixels(out), pixels(translator(image)))
    model_input = pixels(to_image(eval_transform(image, 32)))
    assert overlay.size == (32, 32)
    assert np.abs(pixels(overlay) - model_input).mean() > 10
    assert np.abs(pixels(overlay) - pixels(out)).mean() > 10


def test_batch_size_does_not_change_results(checkpoint):
    images = [random_image(30 + 7 * i, 60 - 5 * i, seed=10 + i) for i in range(5)]
    one = Translator.from_checkpoint(checkpoint, batch_size=1).translate_with_heatmap(images)
    three = Translator.from_checkpoint(checkpoint, batch_size=3).translate_with_heatmap(images)
    for (out1, map1), (out3, map3) in zip(one, three, strict=True):
        assert_same_up_to_rounding(out1, out3)
        assert_same_up_to_rounding(map1, map3)


def test_default_batch_is_one_image_on_a_cpu_and_eight_on_a_gpu(checkpoint):
    assert default_batch_size(torch.device("cpu")) == 1
    assert default_batch_size(torch.device("cuda", 0)) == 8
    assert Translator.from_checkpoint(checkpoint).batch_size == 1
    assert Translator.from_checkpoint(checkpoint, batch_size=4).batch_size == 4
    with pytest.raises(ValueError, match="batch_size=0"):
        Translator.from_checkpoint(checkpoint, batch_size=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        Translator.from_checkpoint(checkpoint)(random_image(32, 32, seed=0), batch_size=0)


# ----------------------------------------------------------------------------------------------
# translate_files


def test_translate_files_names_outputs_after_inputs(tmp_path, translator):
    src = tmp_path / "src"
    write_images(
        [
            src / "single.jpg",
            src / "folder" / "a.png",
            src / "folder" / "sub" / "b.photo.bmp",
            src / "globbed" / "c.png",
            src / "globbed" / "d.png",
            src / "globbed" / "skip.jpg",
            src / "other" / "single.png",
        ]
    )
    out = tmp_path / "out"
    inputs = [src / "single.jpg", src / "folder", str(src / "globbed" / "*.png"), src / "other" / "single.png"]
    # The same file again (through its folder) is translated once.
    written = translate_files(translator, [*inputs, src / "folder" / "a.png"], out, progress=False)
    expected = ["single.png", "a.png", "sub/b.photo.png", "c.png", "d.png", "single_1.png"]
    assert written == [out / name for name in expected]
    assert tree(out) == set(expected)
    for path in written:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size == (32, 32)
    # The first "single" is the .jpg given first: its output is its translation.
    with Image.open(out / "single.png") as img:
        assert np.array_equal(pixels(img), pixels(translator(load_rgb(src / "single.jpg"))))


def test_plan_outputs_keeps_heatmaps_and_case_variants_apart(tmp_path):
    write_images([tmp_path / "x.png", tmp_path / "x_heatmap.png", tmp_path / "sub" / "X.png"])
    inputs = [tmp_path / "x.png", tmp_path / "x_heatmap.png", tmp_path / "sub" / "X.png"]
    jobs = plan_outputs(inputs, "out", heatmap=True)
    names = [(job.output.name, job.heatmap.name) for job in jobs]
    assert names == [
        ("x.png", "x_heatmap.png"),
        ("x_heatmap_1.png", "x_heatmap_1_heatmap.png"),
        ("X_1.png", "X_1_heatmap.png"),
    ]
    assert [job.output.name for job in plan_outputs(inputs, "out")] == ["x.png", "x_heatmap.png", "X_1.png"]


def test_translate_files_refuses_to_overwrite(tmp_path, translator):
    src, out = tmp_path / "src", tmp_path / "out"
    write_images([src / "a.png", src / "b.png"])
    out.mkdir()
    (out / "b.png").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match=r"b\.png.*--overwrite"):
        translate_files(translator, [src], out, progress=False)
    assert tree(out) == {"b.png"} and (out / "b.png").read_bytes() == b"keep me"

    translate_files(translator, [src], out, progress=False, overwrite=True)
    assert tree(out) == {"a.png", "b.png"}
    before = {name: (out / name).read_bytes() for name in tree(out)}
    with pytest.raises(FileExistsError, match="--overwrite"):
        translate_files(translator, [src], out, progress=False)
    assert {name: (out / name).read_bytes() for name in tree(out)} == before


def test_translate_files_never_writes_over_its_inputs(tmp_path, translator):
    write_images([tmp_path / "a.png"])
    with pytest.raises(FileExistsError, match="own input"):
        translate_files(translator, [tmp_path / "a.png"], tmp_path, progress=False, overwrite=True)


def test_translate_files_heatmap_at_input_size(tmp_path, translator):
    write_images([tmp_path / "src" / "x.jpg"], size=(50, 40))
    out = tmp_path / "out"
    written = translate_files(translator, [tmp_path / "src"], out, heatmap=True, original_size=True, progress=False)
    assert written == [out / "x.png"] and tree(out) == {"x.png", "x_heatmap.png"}
    with Image.open(out / "x.png") as translated, Image.open(out / "x_heatmap.png") as overlay:
        assert translated.size == overlay.size == (50, 40)
        with Image.open(tmp_path / "src" / "x.jpg") as original:
            assert np.abs(pixels(overlay) - pixels(original.convert("RGB"))).mean() > 10
        assert np.abs(pixels(overlay) - pixels(translated)).mean() > 10


def test_translate_files_missing_inputs(tmp_path, translator):
    write_images([tmp_path / "a.png"])
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        translate_files(translator, [tmp_path / "a.png", tmp_path / "nope.png"], out, progress=False)
    with pytest.raises(FileNotFoundError, match=r"\*\.webp"):
        translate_files(translator, [tmp_path / "a.png", str(tmp_path / "*.webp")], out, progress=False)
    assert not out.exists()


def test_translate_files_corrupt_input_writes_nothing(tmp_path, translator):
    src, out = tmp_path / "src", tmp_path / "out"
    write_images([src / "a.png", src / "b.png"])
    good = (src / "b.png").read_bytes()
    (src / "c.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(BadImageError, match="c.png"):
        translate_files(translator, [src], out, batch_size=1, progress=False)
    assert tree(out) == set()


def test_translate_files_batch_size_does_not_change_outputs(tmp_path, translator):
    paths = [tmp_path / "src" / f"{i}.png" for i in range(5)]
    for i, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        random_image(30 + 9 * i, 64 - 6 * i, seed=20 + i).save(path)
    for batch_size in (1, 3):
        translate_files(
            translator,
            [tmp_path / "src"],
            tmp_path / f"out{batch_size}",
            batch_size=batch_size,
            heatmap=True,
            progress=False,
        )
    names = tree(tmp_path / "out1")
    assert len(names) == 10 and tree(tmp_path / "out3") == names
    for name in names:
        with Image.open(tmp_path / "out1" / name) as one, Image.open(tmp_path / "out3" / name) as three:
            assert_same_up_to_rounding(one, three)


def test_translating_does_not_load_the_compiler(tmp_path):
    """Importing dynamo costs a translation 1.2 s of start-up and 70 MB: only the discriminators' functions are
    marked eager-under-compile, and the mark is made at their first call (`norms.eager`)."""
    checkpoint = save_checkpoint(tmp_path / "model.safetensors")
    script = (
        "import sys\n"
        "from PIL import Image\n"
        "from ugatit.inference import Translator\n"
        "for fast in (False, True):\n"
        f"    out = Translator.from_checkpoint({str(checkpoint)!r}, 'A2B', fast=fast)(Image.new('RGB', (40, 32)))\n"
        "print(out.size, 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["(32,", "32)", "False"]
