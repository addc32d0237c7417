"""The FID Inception network: InceptionV3 as ported from TensorFlow's 2015-12-05 graph, 2048-d pool_3 features.

KID and FID are only comparable across papers and tools when they use the same network and weights: the TF
`inception-2015-12-05` graph, whose PyTorch port is pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (the same
numbers torch-fidelity and the TF metric scripts use). This module rebuilds that network without torchvision, with
the weight file's exact state_dict layout, so the file loads strictly. The port differs from torchvision's
InceptionV3 in three places, all reproduced here: the average-pool branches of the A, C and E blocks ignore the
zero padding (TF semantics, `count_include_pad=False`), the last E block (Mixed_7c) pools with a max instead of an
average, and the classifier has 1008 outputs.

State dict: 94 conv+BN units (each `conv.weight`, `bn.weight`, `bn.bias`, `bn.running_mean`, `bn.running_var`,
`bn.num_batches_tracked`) plus `fc.weight`, `fc.bias`: 566 keys (472 without the `num_batches_tracked` counters,
which a file written by an old PyTorch may lack; they do nothing in eval mode and are filled in when absent).
"""

from __future__ import annotations

import http.client
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .checkpoint import sha256_of

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
WEIGHTS_SHA256_PREFIX = "6726825d"  # the file name's hash: the start of its sha256
WEIGHTS_ENV = "UGATIT_INCEPTION_WEIGHTS"
NO_DOWNLOAD_ENV = "UGATIT_NO_DOWNLOAD"
FEATURE_DIM = 2048
NUM_CLASSES = 1008
INPUT_SIZE = 299
STATE_DICT_KEYS = 566
_COUNTER = "num_batches_tracked"
_MIXED_BLOCKS = tuple(f"Mixed_{n}" for n in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"))


class InceptionWeightsError(ValueError):
    """The Inception weights cannot be used; the message says why and what to do."""


class WeightsNotFoundError(InceptionWeightsError):
    """No Inception weight file where we looked, and it could not be downloaded."""


# ----------------------------------------------------------------------------------------------
# Network


class ConvBN(nn.Module):
    """Bias-free convolution, batch norm (TF's epsilon 1e-3) and ReLU: one TF conv layer.

    The attribute names `conv` and `bn` are the weight file's.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average that, like TF's, divides by the number of real (unpadded) pixels."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block (Mixed_5b/5c/5d): 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_tf_avg_pool(x)),
        ]
        return torch.cat(branches, 1)


class BlockB(nn.Module):
    """Grid reduction 35x35 -> 17x17 (Mixed_6a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ]
        return torch.cat(branches, 1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e); `c7` is the inner width."""

    def __init__(self, in_channels: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        branches = [
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(double)),
            self.branch_pool(_tf_avg_pool(x)),
        ]
        return torch.cat(branches, 1)


class BlockD(nn.Module):
    """Grid reduction 17x17 -> 8x8 (Mixed_7a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        branches = [
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(seven),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ]
        return torch.cat(branches, 1)


class BlockE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs (Mixed_7b, Mixed_7c).

    `max_pool`: the TF graph's Mixed_7c pools its last branch with a max, not an average (an oddity of that graph
    that every FID implementation has to keep to match the published numbers).
    """

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        branches = [
            self.branch1x1(x),
            self.branch3x3_2a(single),
            self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double),
            self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ]
        return torch.cat(branches, 1)


class FIDInceptionV3(nn.Module):
    """The TF-ported InceptionV3 with the weight file's layer names; `forward` takes 299x299 inputs in [-1, 1] and
    returns the 2048-d pool_3 features.

    `fc` (the 1008-class classifier) is not used for features; it is kept so that the whole file loads strictly
    and a truncated or foreign file cannot pass for the right one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, pool_features=32)
        self.Mixed_5c = BlockA(256, pool_features=64)
        self.Mixed_5d = BlockA(288, pool_features=64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, c7=128)
        self.Mixed_6c = BlockC(768, c7=160)
        self.Mixed_6d = BlockC(768, c7=160)
        self.Mixed_6e = BlockC(768, c7=192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in _MIXED_BLOCKS:
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))


# ----------------------------------------------------------------------------------------------
# Weight file


def cache_dir() -> Path:
    """Where a downloaded weight file is kept: `$XDG_CACHE_HOME/ugatit`, else `~/.cache/ugatit`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ugatit"


def _download_disabled() -> bool:
    return os.environ.get(NO_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _how_to_get(target: Path) -> str:
    return f"download {WEIGHTS_URL} and put it at {target}, or pass its path (--inception-weights) or set {WEIGHTS_ENV}"


def download_weights(target: Path, timeout: float = 60.0, progress: bool = True) -> Path:
    """Fetch the standard file into `target` through a temporary file that is renamed only once its sha256 is
    verified, so an interrupted or corrupted download never leaves a file that looks valid."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(WEIGHTS_URL, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=WEIGHTS_NAME, disable=not progress) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        digest = sha256_of(tmp)
        if not digest.startswith(WEIGHTS_SHA256_PREFIX):
            raise WeightsNotFoundError(
                f"the file downloaded from {WEIGHTS_URL} has sha256 {digest}, not {WEIGHTS_SHA256_PREFIX}...; "
                f"it was discarded. {_how_to_get(target)}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def find_weights(path: str | os.PathLike | None = None, download: bool | None = None) -> Path:
    """The Inception weight file: `path`, else $UGATIT_INCEPTION_WEIGHTS, else the cache dir, else downloaded there.

    `download=None` downloads unless $UGATIT_NO_DOWNLOAD is set. A path that was named explicitly (argument or
    environment) must exist: it is never silently replaced by another file. Raises WeightsNotFoundError with
    where to put the file when there is none.
    """
    named = path if path is not None else os.environ.get(WEIGHTS_ENV) or None
    if named is not None:
        file = Path(named).expanduser()
        if not file.is_file():
            source = "" if path is not None else f" (from ${WEIGHTS_ENV})"
            raise WeightsNotFoundError(f"Inception weights {file}{source}: no such file; {_how_to_get(file)}")
        return file
    target = cache_dir() / WEIGHTS_NAME
    if target.is_file():
        return target
    if download is None:
        download = not _download_disabled()
    if not download:
        why = f" (${NO_DOWNLOAD_ENV} is set)" if _download_disabled() else ""
        raise WeightsNotFoundError(
            f"Inception weights not found and downloading is disabled{why}: {_how_to_get(target)}"
        )
    try:
        return download_weights(target)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # offline, refused, cut short
        message = f"Inception weights not found and the download failed ({exc}): {_how_to_get(target)}"
        raise WeightsNotFoundError(message) from None


def _check_state_dict(state: dict, expected: dict[str, torch.Tensor], path: Path) -> None:
    """Say exactly what is wrong before load_state_dict does, in terms a user can act on."""
    missing = [k for k in expected if k not in state and not k.endswith(_COUNTER)]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    not_tensors = [k for k in expected if k in state and not isinstance(state[k], torch.Tensor)]
    problems = []
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", wrong),
        ("not a tensor", not_tensors),
    ):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:5])}{more}")
    if problems:
        raise InceptionWeightsError(
            f"{path} is not the FID Inception weight file {WEIGHTS_NAME} ({'; '.join(problems)}); "
            f"get the right one from {WEIGHTS_URL}"
        )


def load_inception(path: str | os.PathLike) -> FIDInceptionV3:
    """Build the network and load `path` strictly (every key and shape must match, the classifier included)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a file that is not a tensor pickle
        raise InceptionWeightsError(f"{path}: cannot read it as a PyTorch state_dict ({exc})") from None
    if not isinstance(state, dict):
        raise InceptionWeightsError(f"{path}: holds a {type(state).__name__}, not a state_dict")
    network = FIDInceptionV3()
    expected = network.state_dict()
    _check_state_dict(state, expected, path)
    # A file written by an old PyTorch may lack the BN step counters, which do nothing in eval mode.
    state = {**{k: v for k, v in expected.items() if k.endswith(_COUNTER)}, **state}
    network.load_state_dict(state, strict=True)
    return network.eval().requires_grad_(False)


class InceptionFeatures(nn.Module):
    """Images (B x 3 x H x W, float in [0, 1]) -> B x 2048 pool_3 features, as pytorch-fid computes them.

    Inputs of any size are resized to `input_size` x `input_size` (299) bilinearly (align_corners=False, no
    antialiasing) and mapped to [-1, 1]: pytorch-fid's `resize_input` and `normalize_input`. `sha256` identifies
    the weights in reports; `standard` is True when they are the reference file, and a warning says when they are
    not, because scores from other weights cannot be compared with published ones.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.weights_path = find_weights(weights_path)
        self.sha256 = sha256_of(self.weights_path)
        self.standard = self.sha256.startswith(WEIGHTS_SHA256_PREFIX)
        if not self.standard:
            warnings.warn(
                f"Inception weights {self.weights_path} are not {WEIGHTS_NAME} (sha256 {self.sha256[:16]}...): "
                "KID/FID values will not be comparable with published ones",
                stacklevel=2,
            )
        self.network = load_inception(self.weights_path)
        self.input_size = INPUT_SIZE

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected B x 3 x H x W images, got shape {tuple(images.shape)}")
        size = (self.input_size, self.input_size)
        x = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
        return self.network(2 * x - 1)
