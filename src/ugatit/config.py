"""The one configuration object: every hyper-parameter of a run, with the official defaults.

Everything that shapes a model or a run lives here and nowhere else; networks, trainer, data pipeline and CLI take
their numbers from a `Config` passed to them explicitly. The config is saved inside every checkpoint, so a checkpoint
alone is enough to rebuild its networks.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

# The fast path's compute dtypes by name; "auto" resolves per device (precision.resolve_dtype).
FAST_DTYPES = ("auto", "bfloat16", "float32")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which and what to use instead."""


@dataclass
class Config:
    # Architecture (UGATIT_SPEC.md section 1).
    img_size: int = 256
    ch: int = 64
    n_res: int = 4
    light: bool = False
    global_layers: int = 7
    local_layers: int = 5
    # Loss weights (paper lambda_1..lambda_4).
    adv_weight: float = 1.0
    cycle_weight: float = 10.0
    identity_weight: float = 10.0
    cam_weight: float = 1000.0
    # Optimisation.
    lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.999
    weight_decay: float = 1e-4
    iterations: int = 1_000_000
    batch_size: int = 1
    decay: bool = True
    seed: int = 0
    # Speed: "exact" is the fp32 eager path that meets the official parity; "fast" uses fused normalisations,
    # fused spectral products and fused Adam, autocasts to fast_dtype ("auto": bf16 where the device has bf16
    # hardware, AMX/AVX512-BF16 CPUs and recent GPUs, fp32 elsewhere; precision.py), and in fp32 on CPU runs the
    # generators' large 3x3 convolutions by Winograd (winograd.py).
    precision: str = "exact"
    fast_dtype: str = "auto"
    compile: bool = False
    grad_checkpoint: bool = False
    # Data pipeline.
    augment: bool = True
    # Resize to img_size + crop_margin, then random-crop img_size: the official 30 px is a 12 % zoom at 256 px;
    # at small sizes use ~12 % of img_size instead (a 2x zoom at 32 px trains on crops unlike whole images).
    crop_margin: int = 30
    keep_aspect: bool = False
    num_workers: int = 2
    cache_images: str = "auto"
    # Run bookkeeping.
    save_every: int = 1000
    sample_every: int = 1000
    log_every: int = 10
    keep_last: int = 3
    eval_every: int = 0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def betas(self) -> tuple[float, float]:
        return (self.beta1, self.beta2)

    @property
    def fast(self) -> bool:
        """The fast path: fused kernels, autocast to fast_dtype, Winograd in fp32 on CPU; else the exact fp32 path."""
        return self.precision == "fast"

    def validate(self) -> None:
        """Refuse settings that would fail deep inside a forward pass, with the value to use instead."""
        for name in ("img_size", "ch", "n_res", "iterations", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.img_size % 4 != 0 or self.img_size < 8:
            raise ConfigError(
                f"img_size={self.img_size}: the generator downsamples twice, so img_size must be a multiple of 4 "
                "and at least 8"
            )
        if self.precision not in ("exact", "fast"):
            raise ConfigError(f"precision={self.precision!r} must be 'exact' or 'fast'")
        if self.fast_dtype not in FAST_DTYPES:
            raise ConfigError(f"fast_dtype={self.fast_dtype!r} must be one of: {', '.join(FAST_DTYPES)}")
        if self.crop_margin < 0:
            raise ConfigError(f"crop_margin={self.crop_margin} must be >= 0")
        if self.cache_images not in ("auto", "yes", "no"):
            raise ConfigError(f"cache_images={self.cache_images!r} must be 'auto', 'yes' or 'no'")
        for name in ("global_layers", "local_layers"):
            layers = getattr(self, name)
            if layers < 3:
                raise ConfigError(f"{name}={layers}: a discriminator needs at least 3 layers")
            need = min_image_size(layers)
            if self.img_size < need:
                deepest = max_layers(self.img_size)
                raise ConfigError(
                    f"img_size={self.img_size} is too small for {name}={layers}: it needs img_size >= {need}; "
                    f"use img_size >= {need} or {name} <= {deepest}"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def _disc_output_size(img_size: int, layers: int) -> int:
    """Patch-logit side length of a discriminator with `layers` layers, or 0 if some layer cannot run.

    Every conv is preceded by a reflection pad of 1, which needs an input of at least 2 pixels.
    """
    size = img_size
    for _ in range(layers - 2):  # stride-2 convs, k4, pad 1
        if size < 2:
            return 0
        size = (size + 2 - 4) // 2 + 1
    for _ in range(2):  # the stride-1 conv before the CAM and the final logit conv, k4, pad 1
        if size < 2:
            return 0
        size = size + 2 - 4 + 1
    return max(size, 0)


def min_image_size(layers: int) -> int:
    """Smallest multiple of 4 on which a discriminator of `layers` layers produces at least one logit."""
    size = 8
    while _disc_output_size(size, layers) < 1:
        size += 4
    return size


def max_layers(img_size: int) -> int:
    """Deepest discriminator that still runs on `img_size` pixels (at least 3)."""
    layers = 3
    while _disc_output_size(img_size, layers + 1) >= 1:
        layers += 1
    return layers


PRESETS: dict[str, dict[str, Any]] = {
    # The official defaults (UGATIT_SPEC.md section 3).
    "paper": {},
    "light": {"light": True},
    # Learns visibly on a 2-core CPU in minutes (the quickstart): 64 px, 8 channels, discriminators of 5 and 4
    # layers, batch 4 at lr 5e-4 for 400 steps, no augmentation; the paper's loss weights. Found by a sweep on the
    # synthetic domains (both directions >= 0.77 shape IoU, all outputs judged the target domain).
    "cpu-small": {
        "img_size": 64,
        "ch": 8,
        "n_res": 4,
        "light": True,
        "global_layers": 5,
        "local_layers": 4,
        "batch_size": 4,
        "lr": 5e-4,
        "iterations": 400,
        "augment": False,
        "crop_margin": 8,
        "save_every": 100,
        "sample_every": 100,
        "log_every": 10,
        "num_workers": 0,  # tiny cached images: a worker process would only compete for the 2 cores
    },
}


def preset(name: str, **overrides: Any) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return Config(**{**PRESETS[name], **overrides})
