"""benchmarks/cifar10.py: every expert setting has its own folder, so no run reuses experts made for another."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cifar10  # noqa: E402


def test_each_expert_setting_has_its_own_folder():
    def folder(expert_optimizer="sgd", preprocess=None):
        plan = cifar10.plan_for("cpu", expert_epochs=None, smoke=False, expert_optimizer=expert_optimizer,
                                preprocess=preprocess)
        return cifar10.scale_folder("cpu", plan)

    assert folder() == "cpu" == folder(preprocess="zca")  # the scale's own preprocessing: the records' folder
    plain = cifar10.plan_for("cpu", expert_epochs=None, smoke=False, preprocess="normalize")
    assert plain["experts"]["preprocess"] == "normalize" and cifar10.SCALES["cpu"]["experts"]["preprocess"] == "zca"
    assert folder(preprocess="normalize") == "cpu_normalize-experts"
    assert folder(expert_optimizer="gsam") == "cpu_gsam-experts"
    assert folder(expert_optimizer="gsam", preprocess="normalize") == "cpu_gsam-experts_normalize-experts"
    one = cifar10.plan_for("cpu", expert_epochs=1, smoke=True)
    assert cifar10.scale_folder("cpu", one, expert_epochs=1, smoke=True) == "cpu_experts1ep_smoke"
    assert cifar10.scale_folder("paper", cifar10.plan_for("paper", expert_epochs=None, smoke=False)) == "paper"
