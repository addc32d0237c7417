"""DistributedDataParallel on CPU with gloo and 2 processes (torchrun), against single-process training."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ugatit.checkpoint import list_checkpoints
from ugatit.config import RunConfig
from ugatit.synthetic import write_dataset
from ugatit.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import TINY, batches  # noqa: E402

WORKER = Path(__file__).parent / "ddp_worker.py"


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_ranks_of_batch_one_equal_one_process_of_batch_two(tmp_path):
    out = tmp_path / "states.pt"
    torchrun(str(WORKER), "steps", str(out))
    ranks = torch.load(out, weights_only=True)

    torch.manual_seed(0)
    single = Trainer(TINY, RunConfig(batch_size=2))
    initial_u = {  # the power iterations' u vectors (those of one-row weights are +-1 for good)
        key: value.clone() for key, value in single.nets["disGA"].state_dict().items() if key.endswith("_u")
    }
    initial_u = {key: value for key, value in initial_u.items() if value.numel() > 1}
    real_A, real_B = batches(3)
    for k in range(3):
        single.train_step(real_A[k], real_B[k])

    for name, net in single.nets.items():
        for key, value in net.state_dict().items():
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), f"ranks differ: {name}.{key}"
            diff = (ranks[0][name][key] - value).abs().max().item()
            assert diff <= 1e-5, f"{name}.{key} differs from batch-2 training by {diff}"
    # The spectral norms' power iterations advanced on the ranks (their buffers are not synced at every call).
    assert initial_u and not any(torch.equal(ranks[0]["disGA"][key], u) for key, u in initial_u.items())


def test_ranks_with_different_configs_are_refused(tmp_path):
    out = tmp_path / "message.txt"
    torchrun(str(WORKER), "config", str(out))
    assert "rank 1 was started with other settings than rank 0 (cam_weight 1000.0 vs 1001.0)" in out.read_text()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ddp") / "data", size=32, n_train=6, n_test=2, seed=3)


def test_torchrun_training_and_resuming_on_another_world_size(dataset, tmp_path):
    run = tmp_path / "run"
    args = ["-m", "ugatit", "train", str(dataset), "--run-dir", str(run), "--img-size", "32", "--ch", "4",
            "--n-res", "1", "--light", "--global-layers", "4", "--local-layers", "3", "--num-workers", "0",
            "--iterations", "4", "--sample-every", "2", "--log-every", "1", "--no-progress"]  # fmt: skip
    result = torchrun(*args, "--until", "2")
    assert "2 processes x batch 1 = effective batch 2" in result.stdout
    assert [step for step, _ in list_checkpoints(run)] == [2]
    state = torch.load(list_checkpoints(run)[-1][1] / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["data"]["A"]["consumed"] == 4
    assert len((run / "log.jsonl").read_text().splitlines()) == 2  # rank 0 alone writes

    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "saved with 2 process(es) and resumes on 1" in result.stdout
    assert "continues at sample 4" in result.stdout
    state = torch.load(list_checkpoints(run)[-1][1] / "state.pt", weights_only=True)
    assert state["step"] == 4 and state["world_size"] == 1 and state["data"]["A"]["consumed"] == 6
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_more_ranks_than_images_is_a_clear_error(tmp_path):
    data = write_dataset(tmp_path / "data", size=32, n_train=2, n_test=1, seed=4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3", "-m", "ugatit",
           "train", str(data), "--run-dir", str(tmp_path / "run"), "--img-size", "32", "--ch", "4", "--n-res", "1",
           "--light", "--global-layers", "4", "--local-layers", "3", "--num-workers", "0", "--iterations", "2",
           "--no-progress"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "more ranks than images in trainA: 3 ranks, 2 images" in result.stderr
