"""Faces in real photos: find them (`mtcnn.py`), align each onto the crop layout a model was trained on, translate
the crops, and paste the translations back into the photo.

A face model such as selfie2anime only works on faces cropped and centred like its training images. Each face's
five landmarks (eyes, nose, mouth corners) are mapped onto a template of where they sit in a training crop by a
similarity transform (rotation, uniform scale, shift; least squares), and the photo is warped with it, so a tilted,
small or off-centre face becomes a crop like the training ones. The default template is the selfie2anime layout;
`FaceTemplate` takes any other, in the pixels of a crop of any size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm

from .data import load_rgb
from .inference import HEATMAP_SUFFIX, OUTPUT_SUFFIX, ImageTranslator, check_outputs, expand_inputs
from .mtcnn import MTCNN, Detection
from .visualize import save_image

# Detection runs on a copy whose longer side is at most this; crops come from the full-resolution photo. MTCNN
# finds faces of 20 px and more at the detection size.
DETECT_MAX_SIDE = 1280
WHICH = ("all", "largest")


@dataclass(frozen=True)
class FaceTemplate:
    """Where the five landmarks (left eye, right eye, nose, mouth left, mouth right, as seen in the image) sit in a
    training crop of `size` pixels."""

    points: tuple[tuple[float, float], ...]
    size: int

    def scaled(self, size: int, face_scale: float = 1.0) -> np.ndarray:
        """The points in a crop of `size` pixels; `face_scale` < 1 shrinks the face about the crop's centre (a wider
        margin), > 1 enlarges it."""
        points = np.asarray(self.points, np.float64) * (size / self.size)
        centre = size / 2
        return centre + (points - centre) * face_scale


# The mean MTCNN landmarks of 97 selfie2anime test crops (256 px); they vary by 11-22 px between crops.
SELFIE2ANIME = FaceTemplate(((93.9, 85.0), (170.5, 86.7), (131.5, 135.2), (98.1, 163.8), (162.5, 164.8)), 256)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2 x 3 matrix of the rotation, uniform scale and shift that maps the points `src` onto `dst` with the least
    squared error (Umeyama 1991, without reflection)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    u, singular, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(singular) @ sign) / src_c.var(0).sum()
    shift = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, shift[:, None]])


def _inverse(matrix: np.ndarray) -> np.ndarray:
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


@dataclass(frozen=True)
class Face:
    """A face found in a photo, in the photo's pixels, and the transform from the photo to its aligned crop."""

    box: tuple[float, float, float, float]
    prob: float
    landmarks: np.ndarray  # 5 x 2
    transform: np.ndarray  # 2 x 3, photo -> crop pixels
    size: int  # the crop's side

    def corners(self) -> np.ndarray:
        """The crop's corners in crop pixels."""
        return np.array([[0, 0], [self.size, 0], [0, self.size], [self.size, self.size]], np.float64)

    def crop(self, photo: Image.Image) -> Image.Image:
        """The aligned crop; where it reaches past the photo, the photo's edge pixels are repeated."""
        to_photo = _inverse(self.transform)
        mapped = _apply(to_photo, self.corners())
        left, top = (int(np.ceil(max(0.0, -v))) + 2 for v in mapped.min(0))
        right = int(np.ceil(max(0.0, mapped[:, 0].max() - photo.width))) + 2
        bottom = int(np.ceil(max(0.0, mapped[:, 1].max() - photo.height))) + 2
        padded = Image.fromarray(np.pad(np.asarray(photo), ((top, bottom), (left, right), (0, 0)), mode="edge"))
        shifted = to_photo.copy()
        shifted[:, 2] += (left, top)
        return padded.transform((self.size, self.size), Image.Transform.AFFINE, shifted.reshape(-1).tolist(),
                                Image.Resampling.BICUBIC)  # fmt: skip


def find_faces(
    photo: Image.Image,
    detector: MTCNN,
    size: int,
    which: str = "all",
    face_scale: float = 1.0,
    template: FaceTemplate = SELFIE2ANIME,
) -> list[Face]:
    """The faces of an RGB photo, largest first (`which="largest"`: that one only), each aligned to `template` in a
    crop of `size` pixels. A photo larger than `DETECT_MAX_SIDE` is searched on a downscaled copy.

    Each face is looked at twice: its landmarks are found again in a first aligned crop, where the face is upright
    and at the template's scale, because MTCNN places them less steadily on tilted, small or large faces
    (docs/faces.md has the effect on faces placed by a known transform).
    """
    if which not in WHICH:
        raise ValueError(f"which={which!r} must be one of: {', '.join(WHICH)}")
    factor = min(1.0, DETECT_MAX_SIDE / max(photo.size))
    small = photo if factor == 1.0 else photo.resize(
        (max(1, round(photo.width * factor)), max(1, round(photo.height * factor))), Image.Resampling.BOX
    )  # fmt: skip
    detections: list[Detection] = detector.detect(small)
    if which == "largest":
        detections = detections[:1]
    faces = []
    for d in detections:
        box = tuple(float(v) / factor for v in d.box)
        landmarks = _second_look(photo, np.asarray(d.landmarks, np.float64) / factor, detector, template)
        transform = similarity_transform(landmarks, template.scaled(size, face_scale))
        faces.append(Face(box, float(d.prob), landmarks, transform, size))  # type: ignore[arg-type]
    return faces


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _second_look(photo: Image.Image, landmarks: np.ndarray, detector: MTCNN, template: FaceTemplate) -> np.ndarray:
    """The landmarks found again in the face's crop at the template's own size, in photo pixels (the first ones if
    the crop shows no face)."""
    target = template.scaled(template.size)
    first = Face((0.0, 0.0, 0.0, 0.0), 0.0, landmarks, similarity_transform(landmarks, target), template.size)
    found = detector.detect(first.crop(photo))
    if not found:
        return landmarks
    nearest = min(found, key=lambda d: float(np.abs(np.asarray(d.landmarks) - target).sum()))
    return _apply(_inverse(first.transform), np.asarray(nearest.landmarks, np.float64))


def _face_mask(size: int, face_scale: float) -> Image.Image:
    """A feathered ellipse over the face in crop pixels: 255 inside, 0 well before the crop's border."""
    mask = Image.new("L", (size, size), 0)
    centre, rx, ry = size / 2, 0.38 * size * min(face_scale, 1.0), 0.42 * size * min(face_scale, 1.0)
    ImageDraw.Draw(mask).ellipse((centre - rx, centre - ry, centre + rx, centre + ry), fill=255)
    return mask.filter(ImageFilter.GaussianBlur(0.02 * size))


def paste_back(
    photo: Image.Image, faces: Sequence[Face], crops: Sequence[Image.Image], face_scale: float = 1.0
) -> Image.Image:
    """The photo with each translated crop warped back over its face through a feathered mask; pixels outside the
    masks keep their values exactly."""
    result = photo.copy()
    mask = _face_mask(faces[0].size, face_scale) if faces else None  # every face of a photo has one crop size
    for face, crop in zip(faces, crops, strict=True):
        mapped = _apply(_inverse(face.transform), face.corners())
        x0, y0 = (max(0, int(np.floor(v))) for v in mapped.min(0))
        x1 = min(photo.width, int(np.ceil(mapped[:, 0].max())))
        y1 = min(photo.height, int(np.ceil(mapped[:, 1].max())))
        if x1 <= x0 or y1 <= y0:
            continue
        region = face.transform.copy()  # region pixels -> crop pixels
        region[:, 2] += region[:, :2] @ np.array([x0, y0], np.float64)
        data = region.reshape(-1).tolist()
        warped = crop.convert("RGB").transform((x1 - x0, y1 - y0), Image.Transform.AFFINE, data,
                                               Image.Resampling.BICUBIC)  # fmt: skip
        alpha = mask.transform((x1 - x0, y1 - y0), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)
        result.paste(warped, (x0, y0), alpha)
    return result


# ----------------------------------------------------------------------------------------------
# Files


@dataclass
class FacesReport:
    """What a faces run wrote, and the inputs in which no face was found."""

    outputs: list[Path] = field(default_factory=list)
    no_face: list[Path] = field(default_factory=list)


def _plan(jobs: list[tuple[Path, Path, list[Face]]], out_dir: Path, paste: bool, heatmap: bool) -> list[list[Path]]:
    """Each photo's output files: NAME.png with paste-back, else NAME_face0.png, NAME_face1.png, ...; with heatmaps
    NAME_face{i}_heatmap.png beside each face."""
    plans = []
    for _, name, faces in jobs:
        files = [out_dir / f"{name}{OUTPUT_SUFFIX}"] if paste else []
        for i in range(len(faces)):
            face_name = f"{name}_face{i}"
            if not paste:
                files.append(out_dir / f"{face_name}{OUTPUT_SUFFIX}")
            if heatmap:
                files.append(out_dir / f"{face_name}{HEATMAP_SUFFIX}{OUTPUT_SUFFIX}")
        plans.append(files)
    return plans


def detect_all(
    inputs: Sequence[str | os.PathLike],
    size: int,
    which: str = "all",
    face_scale: float = 1.0,
    template: FaceTemplate = SELFIE2ANIME,
    device: str = "cpu",
    progress: bool = True,
) -> list[tuple[Path, Path, list[Face]]]:
    """(file, output name, faces) of every input image, in order; every image is decoded before anything is written.
    Only the faces are kept: the writing pass decodes each photo again rather than holding a folder of photos."""
    detector = MTCNN(device)
    found = []
    for source, name in tqdm(expand_inputs(inputs), unit="img", desc="faces", disable=not progress):
        found.append((source, name, find_faces(load_rgb(source), detector, size, which, face_scale, template)))
    return found


def _plan_run(
    jobs: list[tuple[Path, Path, list[Face]]],
    out_dir: Path,
    paste: bool,
    heatmap: bool,
    overwrite: bool,
    echo: Callable[[str], None],
) -> tuple[list[tuple[Path, Path, list[Face]]], list[list[Path]], FacesReport]:
    """The photos with faces and their output files, checked against overwriting; photos without one are said."""
    report = FacesReport(no_face=[source for source, _, faces in jobs if not faces])
    if report.no_face:
        echo(f"no face found (MTCNN needs faces of 20 px or more) in {len(report.no_face)} image(s): "
             + ", ".join(str(p) for p in report.no_face))  # fmt: skip
    jobs = [job for job in jobs if job[2]]
    plans = _plan(jobs, out_dir, paste, heatmap)
    check_outputs([path for files in plans for path in files], [source for source, _, _ in jobs], overwrite)
    return jobs, plans, report


def translate_faces(
    translator: ImageTranslator,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    which: str = "all",
    paste: bool = False,
    face_scale: float = 1.0,
    template: FaceTemplate = SELFIE2ANIME,
    heatmap: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> FacesReport:
    """Find, align and translate every face of every input (see `find_faces`), writing the translated crops, or
    with `paste` each photo with its faces pasted back; photos without a face are listed and skipped."""
    size = translator.config.img_size
    found = detect_all(inputs, size, which, face_scale, template, translator.device.type, progress)
    jobs, plans, report = _plan_run(found, Path(out_dir), paste, heatmap, overwrite, echo)
    for (source, _, faces), files in tqdm(list(zip(jobs, plans, strict=True)), unit="img", disable=not progress):
        result = translate_found(translator, load_rgb(source), faces, paste, face_scale, heatmap)
        images = [result.pasted] if paste else []
        for i, crop in enumerate(result.crops):
            images += ([] if paste else [crop]) + ([result.heatmaps[i]] if heatmap else [])
        for image, file in zip(images, files, strict=True):
            save_image(image, file)
        report.outputs.extend(files)
    return report


@dataclass
class PhotoResult:
    """A photo's faces, their translated crops (and heatmaps over the crops), and with paste-back the photo with
    the translations in place."""

    faces: list[Face]
    crops: list[Image.Image]
    heatmaps: list[Image.Image] = field(default_factory=list)
    pasted: Image.Image | None = None


def translate_found(
    translator: ImageTranslator,
    photo: Image.Image,
    faces: list[Face],
    paste: bool = False,
    face_scale: float = 1.0,
    heatmap: bool = False,
) -> PhotoResult:
    """Translate the faces `find_faces` found in `photo` (RGB)."""
    crops = [face.crop(photo) for face in faces]
    pairs = translator.translate_with_heatmap(crops) if heatmap else [(c, None) for c in translator(crops)]
    result = PhotoResult(faces, [out for out, _ in pairs], [overlay for _, overlay in pairs if overlay is not None])
    if paste:
        result.pasted = paste_back(photo, faces, result.crops, face_scale)
    return result


def translate_photo(
    translator: ImageTranslator,
    photo: Image.Image,
    which: str = "all",
    paste: bool = False,
    face_scale: float = 1.0,
    template: FaceTemplate = SELFIE2ANIME,
    heatmap: bool = False,
    detector: MTCNN | None = None,
) -> PhotoResult:
    """Find, align and translate the faces of one photo (any PIL mode; EXIF orientation is not applied here, as
    `data.load_rgb` does for files): the Python counterpart of `ugatit translate --faces`."""
    photo = photo.convert("RGB")
    detector = detector or MTCNN(translator.device)
    faces = find_faces(photo, detector, translator.config.img_size, which, face_scale, template)
    return translate_found(translator, photo, faces, paste, face_scale, heatmap)


def align_faces(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    size: int = 256,
    which: str = "all",
    face_scale: float = 1.0,
    template: FaceTemplate = SELFIE2ANIME,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> FacesReport:
    """A training folder from raw photos: one aligned crop per face (`NAME_face{i}.png`) in `dst`."""
    found = detect_all([src], size, which, face_scale, template, progress=progress)
    jobs, plans, report = _plan_run(found, Path(dst), False, False, overwrite, echo)
    for (source, _, faces), files in zip(jobs, plans, strict=True):
        photo = load_rgb(source)
        for face, file in zip(faces, files, strict=True):
            save_image(face.crop(photo), file)
        report.outputs.extend(files)
    return report
