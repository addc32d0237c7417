"""The two configurations: what a model is (`ModelConfig`) and how a run trains it (`RunConfig`).

A checkpoint, an ONNX file and a Hub folder embed the `ModelConfig` alone: it is all that rebuilding the networks
and feeding them images needs. The `RunConfig` lives in the run folder (`config.json`) beside the checkpoints.
Every field of both has a command-line option of the same name (`--img-size`, `--lr`, ...); field names are unique
across the two, so a flat mapping of settings (a preset, a config file, the options) splits into them unambiguously
(`split_settings`). A run field marked `resumable` may change when a run is resumed; any other change makes it
another run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

# The fast path's compute dtypes by name; "auto" resolves per device (fast.precision.resolve_dtype).
FAST_DTYPES = ("auto", "bfloat16", "float32")
PRECISIONS = ("exact", "fast")
# "official": the networks of the official PyTorch code (models.py); "official-tf": those of the official TensorFlow
# code (tf_models.py), which the authors' released checkpoints need.
ARCHS = ("official", "official-tf")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which and what to use instead."""


def _resumable(default: Any) -> Any:
    return field(default=default, metadata={"resumable": True})


@dataclass(frozen=True)
class ModelConfig:
    """The architecture (docs/spec.md sections 1 and 2) and the input framing the networks were trained on."""

    img_size: int = 256
    ch: int = 64
    n_res: int = 4
    light: bool = False
    global_layers: int = 7
    local_layers: int = 5
    # Inputs are resized to img_size (the official transform), or with keep_aspect their shorter side is, then
    # centre-cropped: translation must frame images as training did.
    keep_aspect: bool = False
    arch: str = "official"
    # official-tf only: AdaILN mixes with clip(rho - 0.1, 0, 1), the TF code's `smoothing` (on there by default, and
    # in the released models). None means the architecture's default.
    rho_smoothing: bool | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"arch={self.arch!r} must be one of: {', '.join(ARCHS)}")
        if self.rho_smoothing is None:
            object.__setattr__(self, "rho_smoothing", self.arch == "official-tf")
        elif self.rho_smoothing and self.arch != "official-tf":
            raise ConfigError("rho_smoothing is part of the TensorFlow architecture: use it with arch='official-tf'")
        _check_positive(self, ("img_size", "ch", "n_res"))
        if self.img_size % 4 != 0 or self.img_size < 8:
            raise ConfigError(
                f"img_size={self.img_size}: the generator downsamples twice, so img_size must be a multiple of 4 "
                "and at least 8"
            )
        for name in ("global_layers", "local_layers"):
            layers = getattr(self, name)
            if layers < 3:
                raise ConfigError(f"{name}={layers}: a discriminator needs at least 3 layers")
            need = min_image_size(layers, self.arch)
            if self.img_size < need:
                raise ConfigError(
                    f"img_size={self.img_size} is too small for {name}={layers} ({self.arch}): it needs img_size >= "
                    f"{need}; use img_size >= {need} or {name} <= {max_layers(self.img_size, self.arch)}"
                )

    def describe(self) -> str:
        mode = "light" if self.light else "full"
        arch = (
            "" if self.arch == "official" else f", {self.arch}" + (" with rho smoothing" if self.rho_smoothing else "")
        )
        return f"{self.img_size} px, ch {self.ch}, n_res {self.n_res}, {mode}{arch}"


@dataclass(frozen=True)
class RunConfig:
    """Everything else a training run needs: loss weights, optimisation, precision, data, bookkeeping."""

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
    iterations: int = _resumable(1_000_000)
    batch_size: int = 1
    decay: bool = True
    seed: int = 0
    # How the step is computed, never what it computes: "exact" is the fp32 path that meets the official parity,
    # "fast" the `ugatit.fast` layer, computing in fast_dtype ("auto": bf16 where the device has bf16 units).
    precision: str = _resumable("exact")
    fast_dtype: str = _resumable("auto")
    compile: bool = _resumable(False)
    grad_checkpoint: bool = _resumable(False)
    # Hand the C heap's free pages back to the OS once per CPU step (`tuning.release_free_heap`).
    release_heap: bool = _resumable(True)
    # Data pipeline. Resize to img_size + crop_margin, then random-crop img_size: the official 30 px is a 12 % zoom
    # at 256 px; at small sizes use ~12 % of img_size instead.
    augment: bool = True
    crop_margin: int = 30
    num_workers: int = _resumable(2)
    cache_images: str = _resumable("auto")
    # Bookkeeping.
    save_every: int = _resumable(1000)
    sample_every: int = _resumable(1000)
    log_every: int = _resumable(10)
    keep_last: int = _resumable(3)
    eval_every: int = _resumable(0)

    def __post_init__(self) -> None:
        _check_positive(self, ("iterations", "batch_size"))
        check_precision(self.precision, self.fast_dtype)
        if self.crop_margin < 0:
            raise ConfigError(f"crop_margin={self.crop_margin} must be >= 0")
        if self.cache_images not in ("auto", "yes", "no"):
            raise ConfigError(f"cache_images={self.cache_images!r} must be 'auto', 'yes' or 'no'")

    @property
    def betas(self) -> tuple[float, float]:
        return (self.beta1, self.beta2)

    @property
    def fast(self) -> bool:
        return self.precision == "fast"


def check_precision(precision: str, fast_dtype: str = "auto") -> None:
    """Refuse a precision or fast dtype name that no command knows, with the names that work."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} must be one of: {', '.join(PRECISIONS)}")
    if fast_dtype not in FAST_DTYPES:
        raise ConfigError(f"fast_dtype={fast_dtype!r} must be one of: {', '.join(FAST_DTYPES)}")


def _check_positive(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}={getattr(config, name)} must be a positive integer")


MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))
RESUMABLE = frozenset(f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("resumable"))


def split_settings(values: dict[str, Any], source: str = "settings") -> tuple[dict[str, Any], dict[str, Any]]:
    """A flat mapping of field names as the model's and the run's; an unknown name is refused."""
    unknown = sorted(set(values) - set(MODEL_FIELDS) - set(RUN_FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}")
    model = {k: v for k, v in values.items() if k in MODEL_FIELDS}
    run = {k: v for k, v in values.items() if k in RUN_FIELDS}
    return model, run


def configs(**values: Any) -> tuple[ModelConfig, RunConfig]:
    """Both configurations from flat settings: `configs(img_size=64, lr=2e-4)`."""
    model, run = split_settings(values)
    return ModelConfig(**model), RunConfig(**run)


def to_dict(config: ModelConfig | RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def model_config_from_dict(values: dict[str, Any], source: str = "model config") -> ModelConfig:
    """A `ModelConfig` from stored settings. Files written before the split embedded every setting of the run;
    their run settings are dropped, since rebuilding the networks never needed them."""
    model, _ = split_settings(values, source)
    return ModelConfig(**model)


def model_config_to_json(config: ModelConfig) -> str:
    return json.dumps(to_dict(config), sort_keys=True)


def _disc_output_size(img_size: int, layers: int, arch: str = "official") -> int:
    """Patch-logit side length of a discriminator with `layers` layers, or 0 if some layer cannot run.

    Every conv is preceded by a reflection pad, which must be smaller than its input. The stride-2 convs pad 1 on
    each side; the two stride-1 4x4 convs (before the CAM, and the logits) pad 1 on each side in the official
    PyTorch code, shrinking the map by 1, and 1 before and 2 after in the TF code, keeping its size.
    """
    size = img_size
    for _ in range(layers - 2):  # stride-2 convs, k4, pad 1
        if size < 2:
            return 0
        size = (size + 2 - 4) // 2 + 1
    after = 2 if arch == "official-tf" else 1
    for _ in range(2):  # the stride-1 conv before the CAM and the final logit conv, k4
        if size < after + 1:
            return 0
        size = size + 1 + after - 4 + 1
    return max(size, 0)


def min_image_size(layers: int, arch: str = "official") -> int:
    """Smallest multiple of 4 on which a discriminator of `layers` layers produces at least one logit."""
    size = 8
    while _disc_output_size(size, layers, arch) < 1:
        size += 4
    return size


def max_layers(img_size: int, arch: str = "official") -> int:
    """Deepest discriminator that still runs on `img_size` pixels (at least 3)."""
    layers = 3
    while _disc_output_size(img_size, layers + 1, arch) >= 1:
        layers += 1
    return layers


PRESETS: dict[str, dict[str, Any]] = {
    # The official defaults (docs/spec.md section 3).
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


def preset(name: str, **overrides: Any) -> tuple[ModelConfig, RunConfig]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return configs(**{**PRESETS[name], **overrides})
