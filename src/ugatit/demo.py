"""`ugatit demo`: a local web page for any ugatit model: drop a photo, see the translation and the attention.

Two layers. `DemoModel` is the page's work in plain Python (load the model once, decode an upload as the data
pipeline does, optionally align faces, translate, draw the heatmap) and raises `DemoError` with a message for the
page on any bad input; `build_app` wraps it in a Gradio page (the optional extra `ugatit[demo]`), which the core
never imports. The page is private by default: it binds 127.0.0.1, sends no analytics or telemetry, loads no web
fonts, makes no share link, and serves one request at a time, so that two visitors do not double the memory.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .backends import load_translator, resolve_backend
from .checkpoint import CheckpointError, read_metadata, resolve_model, stored_networks
from .data import BadImageError, eval_transform, load_rgb, to_image
from .models import DIRECTIONS
from .visualize import save_image

# Photos above this are refused before decoding (a decompression bomb stays a small file); photos that pass are
# brought down to MAX_SIDE on their longer side before anything else.
MAX_MEGAPIXELS = 60
MAX_SIDE = 4096
# The browser sees only this machine: no analytics, no telemetry, no hub calls (set before Gradio is imported).
PRIVATE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1",
               "DO_NOT_TRACK": "1"}  # fmt: skip
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
GRADIO_MAJOR = 6


class DemoError(ValueError):
    """Something wrong with a request, said in one line for the page."""


@dataclass
class PageResult:
    """What the page shows: the image the model saw, its translation, the attention heatmap over the input, the
    translation as a PNG file to download, and a line of status."""

    seen: Image.Image
    translation: Image.Image
    heatmap: Image.Image
    download: Path
    status: str


def model_directions(path: str | os.PathLike) -> list[str]:
    """The directions a model file (or folder) holds: those of its stored generators."""
    stored = stored_networks(path)
    return [direction for direction, generator in DIRECTIONS.items() if generator in stored]


class DemoModel:
    """A model loaded once for the page: a translator per direction it holds, and the face detector when asked."""

    def __init__(self, path: str | os.PathLike, precision: str = "exact", fast_dtype: str = "auto",
                 device: str = "cpu") -> None:  # fmt: skip
        self.path = Path(path)
        backend = resolve_backend(self.path)
        if backend == "onnxruntime":  # one generator, whose direction the file says
            translator = load_translator(self.path, None, backend, device, precision=precision)
            self.translators = {translator.direction: translator}
        else:
            directions = model_directions(self.path)
            if not directions:
                raise CheckpointError(f"{self.path}: holds no generator to translate with")
            self.translators = {
                d: load_translator(self.path, d, backend, device, precision=precision, fast_dtype=fast_dtype)
                for d in directions
            }
        self.directions = list(self.translators)
        first = self.translators[self.directions[0]]
        self.config = first.config
        self.mode = f"{backend}, {precision}" if backend == "torch" else "ONNX Runtime"
        self.device = first.device
        self._detector = None
        self._downloads = tempfile.TemporaryDirectory(prefix="ugatit-demo-")

    def describe(self) -> str:
        """One line for the page: which model, its size and mode."""
        file = self.path if self.path.suffix == ".onnx" else resolve_model(self.path)
        source = read_metadata(file).get("source") if file.suffix != ".onnx" else None
        size = file.stat().st_size / 2**20
        origin = f", imported from {source}" if source else ""
        return (f"{self.path} ({size:.1f} MiB{origin}): {self.config.describe()}; directions "
                f"{', '.join(self.directions)}; {self.mode} on {self.device.type}")  # fmt: skip

    def detector(self) -> Any:
        if self._detector is None:
            from .mtcnn import MTCNN

            self._detector = MTCNN(self.device)
        return self._detector

    def translate(
        self,
        photo: Any,
        direction: str,
        faces: bool = False,
        paste_back: bool = False,
        progress: Callable[[float, str], None] = lambda fraction, what: None,
    ) -> PageResult:
        """Translate an uploaded photo (a path, or Gradio's upload payload) in `direction`."""
        if direction not in self.translators:
            raise DemoError(f"this model translates {' and '.join(self.directions)}, not {direction!r}")
        if paste_back and not faces:
            raise DemoError("pasting back works on aligned faces: tick 'Align faces' too")
        progress(0.05, "reading the photo")
        image, note = read_photo(photo)
        translator = self.translators[direction]
        if faces:
            from .faces import translate_photo

            progress(0.2, "finding faces")
            result = translate_photo(translator, image, which="all" if paste_back else "largest", paste=paste_back,
                                     heatmap=True, detector=self.detector())  # fmt: skip
            if not result.faces:
                raise DemoError("no face found in this photo (faces under 20 px are not found); turn off face "
                                "alignment to translate the whole photo")  # fmt: skip
            seen = result.faces[0].crop(image)
            translation = result.pasted if paste_back else result.crops[0]
            heatmap = result.heatmaps[0]
            note += f"{len(result.faces)} face(s) found; "
        else:
            progress(0.3, "translating")
            translation, heatmap = translator.translate_with_heatmap(image)
            seen = to_image(eval_transform(image, self.config.img_size, self.config.keep_aspect))
        progress(0.95, "writing the result")
        download = Path(self._downloads.name) / f"ugatit_{direction}.png"
        save_image(translation, download)
        return PageResult(seen, translation, heatmap, download, f"{note}translated {direction}")


def read_photo(photo: Any) -> tuple[Image.Image, str]:
    """An upload as an upright 8-bit RGB image (the data pipeline's rules: EXIF rotation, grayscale, alpha, 16 bit),
    and a note when it was made smaller; a file that is not a usable image is a DemoError saying why."""
    path, temporary = _upload_path(photo)
    try:
        image = _decode(path)
    finally:
        if temporary:
            path.unlink(missing_ok=True)
    if max(image.size) <= MAX_SIDE:
        return image, ""
    scale = MAX_SIDE / max(image.size)
    smaller = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    return smaller, f"the {image.width}x{image.height} photo was scaled to {smaller.width}x{smaller.height}; "


def _decode(path: Path) -> Image.Image:
    try:
        with Image.open(path) as header:
            width, height = header.size
    except Image.DecompressionBombError:
        raise DemoError(
            f"this image is too large to open safely; the demo takes up to {MAX_MEGAPIXELS} megapixels"
        ) from None
    except (OSError, ValueError, SyntaxError):
        raise DemoError("this file is not an image that can be read (PNG, JPEG, WebP, BMP, TIFF, ...)") from None
    if width * height > MAX_MEGAPIXELS * 1e6:
        raise DemoError(f"this photo is {width * height / 1e6:.0f} megapixels; the demo takes up to "
                        f"{MAX_MEGAPIXELS}: make it smaller first")  # fmt: skip
    try:
        return load_rgb(path)
    except BadImageError as exc:
        raise DemoError(f"this image cannot be used: {exc.reason}") from None


def _upload_path(photo: Any) -> tuple[Path, bool]:
    """The file behind an upload, and whether it is a temporary one to delete: a path, or Gradio's payload (a file
    it saved, or a data: URL that an API client sent)."""
    if photo is None:
        raise DemoError("choose a photo first (upload one, paste one, or take one with the webcam)")
    if isinstance(photo, (str, os.PathLike)):
        return Path(photo), False
    payload = photo if isinstance(photo, dict) else getattr(photo, "__dict__", {})
    if payload.get("path"):
        return Path(payload["path"]), False
    url = payload.get("url") or ""
    if url.startswith("data:") and "," in url:
        try:
            data = base64.b64decode(url.split(",", 1)[1], validate=True)
        except (binascii.Error, ValueError):
            raise DemoError("the uploaded data is not valid base64 image data") from None
        handle, name = tempfile.mkstemp(prefix="ugatit-upload-")
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        return Path(name), True
    raise DemoError("the upload holds no file")


# ----------------------------------------------------------------------------------------------
# The Gradio page


def _gradio() -> Any:
    for key, value in PRIVATE_ENV.items():
        os.environ.setdefault(key, value)
    from .extras import require

    gr = require("gradio", "demo")
    major = int(gr.__version__.split(".")[0])
    if major != GRADIO_MAJOR:
        raise ImportError(f"ugatit demo needs Gradio {GRADIO_MAJOR}.x, found {gr.__version__}; install it with: "
                          "pip install 'ugatit[demo]'")  # fmt: skip
    return gr


def _examples() -> list[str]:
    folder = Path(__file__).parent / "examples"
    return sorted(str(p) for p in folder.glob("*.jpg"))


def _for_display(image: Image.Image, least: int = 256) -> Image.Image:
    """Small model outputs enlarged (pixels kept square) so that the page shows them; the download is the result."""
    factor = -(-least // min(image.size))
    return (
        image if factor <= 1 else image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    )


def build_app(model: DemoModel) -> Any:
    """The page for `model`, as a Gradio Blocks app (not launched)."""
    gr = _gradio()

    def run(photo: Any, direction: str, faces: bool, paste_back: bool, progress: Any = gr.Progress()) -> tuple:  # noqa: B008
        try:
            result = model.translate(photo, direction, faces, paste_back, lambda f, what: progress(f, desc=what))
        except DemoError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        seen, translation, heatmap = (_for_display(im) for im in (result.seen, result.translation, result.heatmap))
        # A result shown at its own size is the download's file: handing Gradio the image instead would have it
        # compress the same pixels again, at a slower level, which takes seconds for a photo.
        shown = str(result.download) if translation is result.translation else translation
        return seen, shown, heatmap, str(result.download), result.status

    with gr.Blocks(title="ugatit demo", analytics_enabled=False) as app:
        gr.Markdown(f"## U-GAT-IT\n{model.describe()}", elem_id="model")
        with gr.Row():
            with gr.Column(scale=2):
                photo = gr.Image(label="Photo", type="filepath", sources=["upload", "webcam", "clipboard"],
                                 height=360, elem_id="photo")  # fmt: skip
            with gr.Column(scale=1):
                direction = gr.Radio(model.directions, value=model.directions[0], label="Direction")
                faces = gr.Checkbox(label="Align faces (find each face and crop it like the training images)")
                paste_back = gr.Checkbox(label="Paste the translated faces back into the photo")
                button = gr.Button("Translate", variant="primary", elem_id="translate")
                status = gr.Textbox(label="Status", elem_id="status", interactive=False)
                download = gr.File(label="Download the translation", elem_id="download")
        with gr.Row():
            outputs = {
                name: gr.Image(label=label, elem_id=name, interactive=False, format="png", height=360)
                for name, label in (("seen", "What the model saw"), ("translation", "Translation"),
                                    ("heatmap", "Attention (CAM heatmap)"))
            }  # fmt: skip
        examples = _examples()
        if examples:
            gr.Examples(examples, inputs=photo, label="Examples")
        seen, translation, heatmap = outputs.values()
        # preprocess=False: the upload reaches `read_photo` undecoded, which says what is wrong with a bad file
        button.click(run, [photo, direction, faces, paste_back], [seen, translation, heatmap, download, status],
                     preprocess=False, api_name="translate")  # fmt: skip
    app.queue(default_concurrency_limit=1)
    return app


def serve(model: DemoModel, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> Any:
    """Launch the page; returns the app (running in the background when `block` is False)."""
    app = build_app(model)
    gr = _gradio()
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=["ui-monospace", "monospace"])  # no web fonts
    app.launch(server_name=host, server_port=port, share=False, show_error=True, prevent_thread_lock=not block,
               quiet=True, inbrowser=False, theme=theme)  # fmt: skip
    return app
