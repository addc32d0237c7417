"""Faces: MTCNN detection time, and `translate --faces --paste-back` end to end, per photo.

    python benchmarks/faces.py                        # a 256 px crop and a 1024x768 photo; light TF-architecture model
    python benchmarks/faces.py --model selfie2anime.safetensors

Uses the MTCNN fixture's photos (`../shared/reference/fixtures/mtcnn/images`). The end-to-end time covers decoding,
detection, alignment, translation (torch, exact), paste-back and writing the PNG; the model has random weights
unless `--model` names one (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from machine import describe_cpu, medians, random_model
from PIL import Image

from ugatit.checkpoint import read_model_config
from ugatit.config import ModelConfig
from ugatit.faces import find_faces, translate_faces
from ugatit.inference import Translator
from ugatit.mtcnn import MTCNN

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "reference" / "fixtures" / "mtcnn" / "images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model file (default: random weights, light, 256 px, ch 64, official-tf)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    print(describe_cpu())
    detector = MTCNN()
    photo = Image.open(IMAGES / "b_face_small.png").convert("RGB")
    crop = find_faces(Image.open(IMAGES / "a_astronaut.png").convert("RGB"), detector, 256)[0].crop(
        Image.open(IMAGES / "a_astronaut.png").convert("RGB")
    )
    for label, image in (("256x256 face crop", crop), (f"{photo.width}x{photo.height} photo", photo)):
        seconds = medians({label: lambda image=image: detector.detect(image)}, args.reps)[label]
        print(f"detect, {label}: {seconds * 1000:.1f} ms")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model:
            model = Path(args.model)
        else:
            model = random_model(tmp / "model.safetensors", ModelConfig(light=True, arch="official-tf"))
        translator = Translator.from_checkpoint(model, "A2B")
        print(f"model: {args.model or 'random weights'}, {read_model_config(model).describe()}")
        for name in ("b_face_small", "d_two_faces"):
            run = lambda name=name: translate_faces(  # noqa: E731
                translator, [IMAGES / f"{name}.png"], tmp / "out", paste=True, overwrite=True, progress=False,
                echo=lambda line: None,
            )  # fmt: skip
            seconds = medians({name: run}, args.reps)[name]
            print(f"translate --faces --paste-back, {name}: {seconds * 1000:.0f} ms per photo")


if __name__ == "__main__":
    main()
