"""Photo-sized results: writing them, and translating photos at their own size, end to end.

    python benchmarks/photos.py                     # 12-megapixel photos; light 256 px model with random weights
    python benchmarks/photos.py --precision fast --model selfie2anime.safetensors

A translation returned at a photo's size (`translate --original-size`, `--faces --paste-back`, the demo's paste-back)
is a PNG as large as the photo: 12 megapixels for a phone's. Side by side in one run, medians of --reps, taking turns:

- writing one such result as a PNG at Pillow's default zlib level (6) and at ugatit's (`visualize.PNG_LEVEL`),
  both through `files.atomic_write` as `save_image` writes it;
- `translate_files(original_size=True)` on --photos photos, which writes a batch's files while it translates the
  next, against translating and writing each photo in turn (the same translator and PNG level);
- with Gradio installed (`ugatit[demo]`), the demo page's round trip for a photo with a face, aligned and pasted back,
  against the page's own function (`DemoModel.translate`): what the page adds.

The photos are the MTCNN fixture's astronaut (`../shared/reference/fixtures/mtcnn/images`) enlarged to 4032 x 3024
and saved as JPEG; an enlarged photo compresses more readily than a camera's, so a real photo's PNG takes longer.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
from pathlib import Path

from machine import describe_cpu, medians, random_model
from PIL import Image

from ugatit.backends import load_translator
from ugatit.config import ModelConfig
from ugatit.data import load_rgb
from ugatit.files import atomic_write
from ugatit.inference import translate_files
from ugatit.visualize import PNG_LEVEL, save_image

PHOTO = Path(__file__).resolve().parents[2] / "shared/reference/fixtures/mtcnn/images/a_astronaut.png"
PILLOW_LEVEL = 6  # zlib's and Pillow's default


def make_photos(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    folder.mkdir()
    first = folder / "photo0.jpg"
    Image.open(PHOTO).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(first, quality=92)
    for i in range(1, count):
        shutil.copy(first, folder / f"photo{i}.jpg")
    return sorted(folder.iterdir())


def page_round_trip(model: Path, precision: str, photo: Path, reps: int) -> None:
    try:
        from gradio_client import Client, handle_file

        from ugatit.demo import DemoModel, serve
    except ImportError:
        print("demo page: skipped (needs ugatit[demo])")
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    page = DemoModel(model, precision=precision)
    app = serve(page, "127.0.0.1", port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        times = medians(
            {
                "page round trip": lambda: client.predict(handle_file(str(photo)), "A2B", True, True,
                                                          api_name="/translate"),
                "DemoModel.translate": lambda: page.translate(str(photo), "A2B", faces=True, paste_back=True),
            },
            reps,
        )  # fmt: skip
    finally:
        app.close()
    for name, seconds in times.items():
        print(f"demo, faces aligned and pasted back, {name}: {seconds:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model file with an A2B generator (default: random weights, light, 256 px)")
    parser.add_argument("--precision", default="exact", choices=("exact", "fast"))
    parser.add_argument("--photos", type=int, default=4, help="photos per translate_files call")
    parser.add_argument("--size", type=int, nargs=2, default=(4032, 3024), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(describe_cpu())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else random_model(tmp / "model.safetensors", ModelConfig(light=True))
        translator = load_translator(model, "A2B", "torch", "cpu", precision=args.precision)
        photos = make_photos(tmp / "photos", args.photos, tuple(args.size))
        print(f"model: {args.model or 'random weights'}, {translator.config.describe()}, {args.precision}; "
              f"{len(photos)} photos of {args.size[0]} x {args.size[1]}")  # fmt: skip

        result = translator([load_rgb(photos[0])], original_size=True)[0]
        files = {level: tmp / f"level{level}.png" for level in (PILLOW_LEVEL, PNG_LEVEL)}
        writes = medians(
            {
                f"Pillow's default (level {PILLOW_LEVEL})": lambda: atomic_write(
                    files[PILLOW_LEVEL], lambda tmp: result.save(tmp, format="PNG", compress_level=PILLOW_LEVEL)
                ),
                f"ugatit's (level {PNG_LEVEL})": lambda: save_image(result, files[PNG_LEVEL]),
            },
            args.reps,
        )  # fmt: skip
        for (name, seconds), file in zip(writes.items(), files.values(), strict=True):
            print(f"writing a {result.width} x {result.height} result, {name}: {seconds:.2f} s, "
                  f"{file.stat().st_size / 2**20:.1f} MiB")  # fmt: skip

        def in_turn() -> None:
            for photo in photos:
                save_image(translator([load_rgb(photo)], original_size=True)[0], tmp / "in_turn" / f"{photo.stem}.png")

        runs = medians(
            {
                "translate_files": lambda: translate_files(translator, photos, tmp / "out", original_size=True,
                                                           overwrite=True, progress=False),
                "translate, then write, in turn": in_turn,
            },
            args.reps,
        )  # fmt: skip
        for name, seconds in runs.items():
            print(f"{name}: {seconds / len(photos):.2f} s per photo")
        page_round_trip(model, args.precision, photos[0], args.reps)


if __name__ == "__main__":
    main()
