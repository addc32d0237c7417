"""MTCNN face detector (Zhang et al. 2016): three cascaded CNNs that find faces and their five landmarks.

P-Net scans an image pyramid for face candidates, R-Net re-scores and refines their boxes on 24x24 crops, and O-Net
gives the final score, box and landmarks on 48x48 crops. This is a torch-only port that reproduces facenet-pytorch
2.6.0's `MTCNN(keep_all=True).detect(img, landmarks=True)`: same networks, same float32 arithmetic in the same order,
the same NMS variants (torchvision's greedy IoU NMS restated in torch, and facenet-pytorch's numpy "Min" NMS), so the
detections agree to float32 noise, without torchvision, OpenCV or facenet-pytorch itself.

The weights are facenet-pytorch's (MIT licence, Copyright (c) 2019 Timothy Esler), converted to safetensors; they
ship in `ugatit/weights/` together with their licence file. The conventions a port has to get right (the transposed
flatten before the first Linear layer, 'area' resampling, the +1 and no-+1 box arithmetic, clipped rather than padded
crops, the NMS tie-breaking) are in docs/faces.md; `tests/test_mtcnn.py` checks the port against facenet-pytorch's
recorded outputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from .devices import ieee_fp32

WEIGHTS = Path(__file__).parent / "weights" / "mtcnn.safetensors"

# Above this many box coordinates torchvision's CPU `batched_nms` takes its per-class loop, which re-sorts the kept
# boxes by score with an unstable sort; below it, the coordinate-offset path keeps the NMS order.
_BATCHED_NMS_LOOP_ABOVE = 4000


@dataclass(frozen=True)
class Detection:
    """One face. Landmarks are (x, y) of left eye, right eye, nose, mouth left, mouth right, left and right as seen in
    the image (point 0 has the smaller x). The box may lie partly outside the image."""

    box: tuple[float, float, float, float]
    prob: float
    landmarks: np.ndarray


@dataclass(frozen=True)
class Stages:
    """What each stage handed on, for finding where a result leaves the reference: the boxes (x1, y1, x2, y2, score;
    float32, M x 5) whose truncation gives the R-Net and the O-Net crops, and the final detections."""

    rnet_input_boxes: np.ndarray
    onet_input_boxes: np.ndarray
    detections: list[Detection]


# ----------------------------------------------------------------------------------------------
# Networks (facenet-pytorch's layer names, so that its state_dicts load strictly)


def _flatten_transposed(x: torch.Tensor) -> torch.Tensor:
    """Flatten in (W, H, C) order: the weights came from a TF port that fed transposed images, and facenet-pytorch
    moved that transpose into the conv kernels but not into the first Linear layer."""
    return x.permute(0, 3, 2, 1).contiguous().view(x.shape[0], -1)


class PNet(nn.Module):
    """Proposal network: fully convolutional, one 12x12 window per output cell at stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), F.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    """Refinement network on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_flatten_transposed(x)))
        return self.dense5_2(x), F.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output network on 48x48 crops; its landmark output is x1..x5 then y1..y5, relative to the crop."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(_flatten_transposed(x)))
        return self.dense6_2(x), self.dense6_3(x), F.softmax(self.dense6_1(x), dim=1)


# ----------------------------------------------------------------------------------------------
# Non-maximum suppression


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy IoU NMS with torchvision's CPU kernel semantics, which MTCNN's candidate sets depend on: a stable
    descending sort (tied scores keep index order), unclamped areas, the IoU in the kernel's float32 order, and
    suppression only when IoU > threshold. Returns kept indices, best first.

    The comparison runs in float32 where the kernel compares in double; for the thresholds MTCNN uses (0.5, 0.7)
    both decide alike for every float32 IoU, since float32(0.7) < 0.7 < the next float32."""
    order = scores.sort(stable=True, descending=True)[1]
    x1, y1, x2, y2 = boxes[order].unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    keep = []
    i = 0
    while i < len(order):
        keep.append(i)
        rest = slice(i + 1, None)
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest])).clamp_(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest])).clamp_(min=0)
        inter = w * h
        suppressed[rest] |= inter / (areas[i] + areas[rest] - inter) > threshold
        left = (~suppressed[rest]).nonzero()
        if len(left) == 0:
            break
        i += 1 + int(left[0])
    return order[keep]


def _batched_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """torchvision's `batched_nms` for boxes that all belong to one image (one class), as facenet-pytorch calls it:
    the coordinate-offset path adds zero and returns the NMS order, while the per-class path, taken above 4000
    coordinates, re-sorts the kept boxes with torch's default (unstable) sort."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    keep = nms(boxes, scores, threshold)
    if boxes.numel() > _BATCHED_NMS_LOOP_ABOVE:
        keep = keep[scores[keep].sort(descending=True)[1]]
    return keep


def _nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """facenet-pytorch's final numpy NMS, "Min" method: overlap is the intersection over the smaller box, with the +1
    pixel convention, highest score (last of `np.argsort`) first, suppressed when overlap > threshold. Kept for its
    numpy semantics (float32 arrays, numpy's default argsort) rather than folded into `nms`."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores)
    pick = []
    while order.size > 0:
        i = order[-1]
        pick.append(i)
        idx = order[:-1]
        w = np.maximum(0.0, np.minimum(x2[i], x2[idx]) - np.maximum(x1[i], x1[idx]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[idx]) - np.maximum(y1[i], y1[idx]) + 1)
        overlap = w * h / np.minimum(area[i], area[idx])
        order = idx[overlap <= threshold]
    return np.array(pick, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# Box arithmetic (facenet-pytorch's detect_face helpers, same float32 operations in the same order)


def _bbreg(boxes: torch.Tensor, reg: torch.Tensor, plus_one: bool = True) -> torch.Tensor:
    """Box regression: offsets are fractions of the width and height, +1-pixel ones after R-Net and O-Net, plain
    ones after P-Net (facenet-pytorch's two conventions)."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    if plus_one:
        w, h = w + 1, h + 1
    x1, y1 = boxes[:, 0] + reg[:, 0] * w, boxes[:, 1] + reg[:, 1] * h
    x2, y2 = boxes[:, 2] + reg[:, 2] * w, boxes[:, 3] + reg[:, 3] * h
    return torch.stack([x1, y1, x2, y2, boxes[:, 4]], dim=1)


def _rerec(boxes: torch.Tensor) -> torch.Tensor:
    """Square each box on its longer side about its centre, since the next network takes square crops."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = torch.max(w, h)
    x1 = boxes[:, 0] + w * 0.5 - side * 0.5
    y1 = boxes[:, 1] + h * 0.5 - side * 0.5
    return torch.stack([x1, y1, x1 + side, y1 + side, boxes[:, 4]], dim=1)


def _crops(image: torch.Tensor, boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The boxes whose crop is not empty, and their image patches, clipped to the image (not zero-padded: so does
    facenet-pytorch), area-resampled to size x size and normalised, in one batch."""
    h, w = image.shape[2:4]
    corners = boxes[:, :4].trunc().int().cpu().numpy()
    x, y = np.maximum(corners[:, 0], 1), np.maximum(corners[:, 1], 1)
    ex, ey = np.minimum(corners[:, 2], w), np.minimum(corners[:, 3], h)
    valid = np.flatnonzero((ey > y - 1) & (ex > x - 1))
    if len(valid) == 0:
        return boxes[:0], image.new_zeros(0, 3, size, size)
    # Slicing the single image then unsqueezing, as facenet-pytorch does, makes torch pick the NCHW pooling kernel
    # (a batch-dim slice would keep channels-last strides and sum in another order).
    patches = [
        F.interpolate(image[0, :, y[k] - 1 : ey[k], x[k] - 1 : ex[k]].unsqueeze(0), size=(size, size), mode="area")
        for k in valid
    ]
    kept = boxes[torch.as_tensor(valid, dtype=torch.int64, device=boxes.device)]
    return kept, (torch.cat(patches) - 127.5) * 0.0078125


def _candidates(reg: torch.Tensor, prob: torch.Tensor, scale: float, threshold: float) -> torch.Tensor:
    """P-Net cells scoring >= threshold as rows (x1, y1, x2, y2, score, dx1, dy1, dx2, dy2) in input pixels. The
    corners divide float32 by the Python float `scale` exactly as torch does (in float32): float64 moves boxes."""
    mask = prob >= threshold
    cells = mask.nonzero().float().flip(1)
    q1 = ((2 * cells + 1) / scale).floor()
    q2 = ((2 * cells + 12) / scale).floor()
    return torch.cat([q1, q2, prob[mask].unsqueeze(1), reg[:, mask].permute(1, 0)], dim=1)


# ----------------------------------------------------------------------------------------------
# Detector


def _load_weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"MTCNN weights not found at {path} (expected the mtcnn.safetensors shipped in ugatit)")
    tensors = load_file(str(path))
    nets: dict[str, dict[str, torch.Tensor]] = {"pnet": {}, "rnet": {}, "onet": {}}
    for key, value in tensors.items():
        net, _, name = key.partition(".")
        nets[net][name] = value
    return nets


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        raise ValueError("MTCNN.detect takes a PIL image or an H x W x 3 uint8 RGB numpy array")
    return image


class MTCNN:
    """The three-stage detector with facenet-pytorch's defaults. `detect` returns every face (keep_all)."""

    def __init__(
        self,
        device: str | torch.device = "cpu",
        min_face_size: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        weights: str | os.PathLike | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.min_face_size = min_face_size
        self.thresholds = tuple(thresholds)
        self.factor = factor
        state = _load_weights(Path(weights) if weights is not None else WEIGHTS)
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        for name, net in (("pnet", self.pnet), ("rnet", self.rnet), ("onet", self.onet)):
            net.load_state_dict(state[name])
            net.to(self.device).eval()

    def detect(self, image: Image.Image | np.ndarray) -> list[Detection]:
        """All faces, largest box area first (as detect() sorts them); [] when none. A PIL image of any mode is
        converted to RGB first; a numpy array must be HxWx3 uint8 RGB."""
        return self.stages(image).detections

    def stages(self, image: Image.Image | np.ndarray) -> Stages:
        """`detect`, also returning the boxes that fed R-Net and O-Net, to locate a divergence from the reference."""
        with torch.inference_mode(), ieee_fp32():
            return self._run(_as_rgb_array(image))

    def _scales(self, h: int, w: int) -> list[float]:
        scale = 12.0 / self.min_face_size
        min_side = min(h, w) * scale
        scales = []
        while min_side >= 12:
            scales.append(scale)
            scale *= self.factor
            min_side *= self.factor
        return scales

    def _run(self, array: np.ndarray) -> Stages:
        # NHWC uint8 -> NCHW float32 keeps channels-last strides, as facenet-pytorch's permute + .type() does, so
        # that the resampling and convolutions take the same kernels.
        image = torch.as_tensor(array.copy(), device=self.device).unsqueeze(0).permute(0, 3, 1, 2).to(torch.float32)
        h, w = image.shape[2:4]
        empty = np.zeros((0, 5), np.float32)

        # Stage 1: P-Net over the pyramid, NMS within each scale, then across scales.
        per_scale = []
        for scale in self._scales(h, w):
            pyramid = F.interpolate(image, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            reg, prob = self.pnet((pyramid - 127.5) * 0.0078125)
            rows = _candidates(reg[0], prob[0, 1], scale, self.thresholds[0])
            per_scale.append(rows[_batched_nms(rows[:, :4], rows[:, 4], 0.5)])
        boxes = torch.cat(per_scale) if per_scale else image.new_zeros(0, 9)
        boxes = boxes[_batched_nms(boxes[:, :4], boxes[:, 4], 0.7)]
        boxes = _rerec(_bbreg(boxes[:, :5], boxes[:, 5:9], plus_one=False))
        rnet_input = boxes.cpu().numpy()
        if len(boxes) == 0:
            return Stages(rnet_input, empty, [])

        # Stage 2: R-Net re-scores the stage-1 boxes, then NMS, then its regression.
        boxes, crops = _crops(image, boxes, 24)
        if len(boxes) == 0:
            return Stages(rnet_input, empty, [])
        reg, prob = self.rnet(crops)
        passed = prob[:, 1] > self.thresholds[1]
        boxes = torch.cat([boxes[passed, :4], prob[passed, 1:2]], dim=1)
        reg = reg[passed]
        pick = _batched_nms(boxes[:, :4], boxes[:, 4], 0.7)
        boxes = _rerec(_bbreg(boxes[pick], reg[pick]))
        onet_input = boxes.cpu().numpy()
        if len(boxes) == 0:
            return Stages(rnet_input, onet_input, [])

        # Stage 3: O-Net scores, landmarks (from the box before regression), regression, then "Min" NMS.
        boxes, crops = _crops(image, boxes, 48)
        if len(boxes) == 0:
            return Stages(rnet_input, onet_input, [])
        reg, marks, prob = self.onet(crops)
        passed = prob[:, 1] > self.thresholds[2]
        boxes = torch.cat([boxes[passed, :4], prob[passed, 1:2]], dim=1)
        marks = marks[passed]
        w_i = boxes[:, 2] - boxes[:, 0] + 1
        h_i = boxes[:, 3] - boxes[:, 1] + 1
        points_x = w_i[:, None] * marks[:, :5] + boxes[:, 0:1] - 1
        points_y = h_i[:, None] * marks[:, 5:] + boxes[:, 1:2] - 1
        points = torch.stack([points_x, points_y], dim=2).cpu().numpy()
        boxes = _bbreg(boxes, reg[passed]).cpu().numpy()
        pick = _nms_min(boxes[:, :4], boxes[:, 4], 0.7)
        boxes, points = boxes[pick], points[pick]

        order = np.argsort((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[::-1]
        detections = [
            Detection(box=tuple(float(v) for v in boxes[k, :4]), prob=float(boxes[k, 4]), landmarks=points[k].copy())
            for k in order
        ]
        return Stages(rnet_input, onet_input, detections)
