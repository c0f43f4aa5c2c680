"""benchmarks/unroll_levers.py: its kernel variants compute the same unroll as the eager one."""

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import unroll_levers  # noqa: E402
from mttlss.models import build_model, model_spec  # noqa: E402


def _model():
    torch.manual_seed(0)
    return build_model(model_spec("convnet", width=8, depth=2), channels=3, num_classes=10, image_size=(16, 16))


def test_gemm_convs_keep_the_parameters_and_the_outputs():
    model = _model()
    gemm = unroll_levers.with_gemm_convs(model)
    assert not any(type(m) is nn.Conv2d for m in gemm.modules())
    assert sum(isinstance(m, unroll_levers.GemmConv2d) for m in gemm.modules()) == 2
    assert [n for n, _ in gemm.named_parameters()] == [n for n, _ in model.named_parameters()]
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(gemm(x), model(x), rtol=1e-5, atol=1e-5)


def test_reshape_pools_and_explicit_norms_keep_the_parameters_and_the_outputs():
    model = _model()
    x = torch.randn(4, 3, 16, 16)
    for copy, new_type, old_type in ((unroll_levers.with_reshape_pools(model), unroll_levers.ReshapePool2d, nn.AvgPool2d),
                                     (unroll_levers.with_explicit_norms(model), unroll_levers.ExplicitInstanceNorm, None)):
        assert sum(type(m) is new_type for m in copy.modules()) == 2
        if old_type is not None:
            assert not any(isinstance(m, old_type) for m in copy.modules())
        assert [n for n, _ in copy.named_parameters()] == [n for n, _ in model.named_parameters()]
        torch.testing.assert_close(copy(x), model(x), rtol=1e-5, atol=1e-5)


def test_halves_in_parallel_times_two_one_thread_processes():
    seconds = unroll_levers.halves_in_parallel(steps=1, lead_s=12.0)
    assert 0 < seconds < 12.0


def test_kernel_variants_give_the_eager_image_gradient():
    model = _model()
    start = {k: v.detach() for k, v in model.named_parameters()}
    images, labels = torch.randn(10, 3, 16, 16), torch.arange(10)
    fns = unroll_levers.inner_gradients(model, compile=False)
    assert set(fns) == {"eager", "channels_last", "gemm_conv", "func_grad", "reshape_pool", "explicit_norm"}
    ref_x, ref_alpha = unroll_levers.unroll(fns["eager"], start, images, labels, steps=3)
    assert ref_x.abs().sum() > 0 and ref_alpha != 0
    for name in ("channels_last", "gemm_conv", "func_grad", "reshape_pool", "explicit_norm"):
        gx, galpha = unroll_levers.unroll(fns[name], start, images, labels, steps=3)
        torch.testing.assert_close(gx, ref_x, rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(galpha, ref_alpha, rtol=1e-4, atol=1e-7, msg=name)
