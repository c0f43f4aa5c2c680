"""benchmarks/gpu_estimate.py: the paper protocol's cost per stage from counted FLOPs and measured graph bytes."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_estimate  # noqa: E402


@pytest.fixture(scope="module")
def counted():
    return gpu_estimate.counted(10, batch=4, steps=1)


def test_counted_flops_relate_as_the_unroll_says(counted):
    train, test = counted["train_flop_per_image"], counted["test_flop_per_image"]
    assert 2.5 * test < train < 3.5 * test  # a training step is a forward and a backward of about twice its cost
    full, ckpt = counted["unroll_flop_per_image_step_full"], counted["unroll_flop_per_image_step_checkpoint"]
    assert full > 2 * train  # the inner step plus its double backward in the outer pass
    assert full < ckpt < full + 1.5 * train  # checkpoint mode replays one forward and backward per step
    assert counted["graph_bytes_per_image_step"] > 0
    # the per-step part of the graph is one parameter vector theta [P] (float32)
    assert counted["graph_bytes_per_step"] == pytest.approx(4 * counted["params"], rel=0.05)


def test_stages_count_the_presets_images_and_memory(counted):
    experts, distill, evaluate = gpu_estimate.stages("cifar10_ipc10_lowrank", counted)
    assert experts["what"] == "100 x 50 epochs x 45,000 images"
    assert distill["flop"] > 10_000 * 80 * 100 * counted["unroll_flop_per_image_step_checkpoint"]  # + validations
    step_graph = 100 * counted["graph_bytes_per_image_step"] + counted["graph_bytes_per_step"]
    assert distill["gib_full"] == pytest.approx(1.2 * 80 * step_graph / 2**30)
    assert distill["what"] == "10,000 it x 80 steps x 100; 4 + 20 validations"  # 3 temperatures + hard, then 1 per 500
    assert distill["gib_checkpoint"] < distill["gib_full"] / 10
    assert evaluate["what"] == f"5 x 1000 epochs x {distill['decoded_images']:,}"
    # CIFAR-100 IPC 50's window needs more than the paper's 50 expert epochs
    assert gpu_estimate.expert_epochs_for("cifar100") == 71


def test_the_table_says_its_times_are_estimates(counted):
    rows = gpu_estimate.stages("svhn_ipc1_pixel", counted)
    table = gpu_estimate.markdown({"date": "d", "tflops": 10.0, "counted": {100: counted}, "rows": rows})
    assert "an assumed rate, not a measurement" in table
    assert table.count("| svhn_ipc1_pixel |") == 3
