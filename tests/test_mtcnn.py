"""The MTCNN port against facenet-pytorch 2.6.0's recorded outputs (shared/reference/fixtures/mtcnn, README there).

Tolerances are the fixture README's: float32 noise across CPU kinds stays far below them, while the real bugs it
measured (no +1 in the box regression, bilinear instead of 'area' resampling) move boxes by 0.08 px or more."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED
from ugatit.mtcnn import MTCNN, Detection, nms

FIXTURES = SHARED / "reference" / "fixtures" / "mtcnn"
IMAGES = ("a_astronaut", "b_face_small", "c_face_small_rot15", "d_two_faces", "e_astronaut_gray", "f_chelsea_noface")


@pytest.fixture(scope="module")
def fixtures():
    if not (FIXTURES / "reference.json").is_file():
        pytest.skip(f"MTCNN reference fixture not found at {FIXTURES} (set UGATIT_SHARED to the shared/ folder)")
    return FIXTURES


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The reference ran on one thread (two give the same detections, within the tolerances); one thread also keeps
    these runs fast when other work shares the CPU, where two threads wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def detector():
    return MTCNN()


@pytest.fixture(scope="module")
def reference(fixtures):
    return json.loads((fixtures / "reference.json").read_text())["images"]


@pytest.fixture(scope="module")
def stages(fixtures, detector, reference):
    """One pipeline run per image, shared by the detection and the stage tests (each run takes ~0.1 s)."""
    return {name: detector.stages(Image.open(fixtures / reference[name]["file"])) for name in IMAGES}


TAPS = {
    "pnet": {"pool1": "pool1", "prelu3": "prelu3"},
    "rnet": {"pool1": "pool1", "pool2": "pool2", "prelu3": "prelu3", "dense4_in": "dense4", "prelu4": "prelu4"},
    "onet": {
        "pool1": "pool1",
        "pool2": "pool2",
        "pool3": "pool3",
        "prelu4": "prelu4",
        "dense5_in": "dense5",
        "prelu5": "prelu5",
    },
}
OUTPUTS = {"pnet": ("reg", "prob"), "rnet": ("reg", "prob"), "onet": ("reg", "landmarks", "prob")}


@pytest.mark.parametrize("name", ["pnet", "rnet", "onet"])
def test_nets_match_layer_probe(fixtures, detector, name):
    probe = np.load(fixtures / "nets.npz")
    net = getattr(detector, name)
    seen = {}
    hooks = []
    for tap, module_name in TAPS[name].items():
        module = getattr(net, module_name)
        if tap.endswith("_in"):  # the permuted flatten, as it enters the Linear layer

            def hook(module, args, tap=tap):
                seen[tap] = args[0]

            hooks.append(module.register_forward_pre_hook(hook))
        else:

            def hook(module, args, output, tap=tap):
                seen[tap] = output

            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            outputs = net(torch.from_numpy(probe[f"{name}.input"]))
    finally:
        for h in hooks:
            h.remove()
    assert len(outputs) == len(OUTPUTS[name])
    for key, out in zip(OUTPUTS[name], outputs, strict=True):
        np.testing.assert_allclose(out.numpy(), probe[f"{name}.{key}"], rtol=0, atol=1e-5, err_msg=f"{name}.{key}")
    assert seen.keys() == TAPS[name].keys()
    for tap, value in seen.items():
        expected = probe[f"{name}.tap.{tap}"]
        assert value.shape == expected.shape, tap
        np.testing.assert_allclose(value.numpy(), expected, rtol=0, atol=1e-4, err_msg=f"{name}.tap.{tap}")


@pytest.mark.parametrize("name", IMAGES)
def test_detections_match_facenet_pytorch(stages, reference, name):
    ref = reference[name]
    detections = stages[name].detections
    assert len(detections) == ref["n_faces"]
    if ref["n_faces"] == 0:
        assert detections == []
        return
    assert all(isinstance(d, Detection) for d in detections)
    boxes = np.array([d.box for d in detections])
    probs = np.array([d.prob for d in detections])
    landmarks = np.stack([d.landmarks for d in detections])
    assert landmarks.dtype == np.float32 and landmarks.shape == (ref["n_faces"], 5, 2)
    np.testing.assert_allclose(boxes, np.array(ref["boxes"]), rtol=0, atol=1e-3)
    np.testing.assert_allclose(probs, np.array(ref["probs"]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(landmarks, np.array(ref["landmarks"]), rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", IMAGES)
def test_stage_boxes_match_facenet_pytorch(fixtures, stages, name):
    recorded = np.load(fixtures / "stages.npz")
    for key in ("rnet_input_boxes", "onet_input_boxes"):
        # The fixture omits a stage no box reached (the cat: R-Net passes nothing).
        expected = recorded[f"{name}.{key}"] if f"{name}.{key}" in recorded.files else np.zeros((0, 5), np.float32)
        mine = getattr(stages[name], key)
        assert mine.shape == expected.shape, key
        np.testing.assert_allclose(mine, expected, rtol=0, atol=1e-3, err_msg=key)


def test_input_kinds_give_the_same_detections(fixtures, detector, stages):
    rgb = Image.open(fixtures / "images" / "a_astronaut.png").convert("RGB")
    expected = stages["a_astronaut"].detections
    assert len(expected) == 1
    for image in (rgb.convert("RGBA"), np.asarray(rgb)):
        got = detector.detect(image)
        assert len(got) == len(expected)
        for d, e in zip(got, expected, strict=True):
            assert d.box == e.box and d.prob == e.prob
            np.testing.assert_array_equal(d.landmarks, e.landmarks)


def test_rejects_arrays_that_are_not_hwc_uint8_rgb(detector):
    with pytest.raises(ValueError, match="uint8 RGB"):
        detector.detect(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="uint8 RGB"):
        detector.detect(np.zeros((64, 64), np.uint8))


def test_missing_weights_say_where_they_were_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="MTCNN weights not found"):
        MTCNN(weights=tmp_path / "nope.safetensors")


def test_nms_keeps_tied_scores_in_index_order_and_an_iou_equal_to_the_threshold():
    # Boxes 0 and 1 tie and overlap fully: the first index wins. Box 2 has IoU exactly 0.5 with box 0: kept.
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 6.0, 6.0]])
    scores = torch.tensor([0.9, 0.9, 0.8, 0.95])
    assert nms(boxes, scores, 0.5).tolist() == [3, 0, 2]
    assert nms(boxes, scores, 0.4).tolist() == [3, 0]
