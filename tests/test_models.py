import pytest
import torch

import torch.nn.functional as F
from torch import nn

from mttlss.models import MODELS, AvgPool2x2, ConvNet, ParamLayout, build_model, has_buffers, model_spec


def _convnet(**kw):
    args = dict(channels=3, num_classes=10, image_size=(32, 32))
    args.update(kw)
    return ConvNet(**args)


@pytest.mark.parametrize("classes, expected", [(10, 320_010), (100, 504_420)])
def test_convnet3_parameter_count(classes, expected):
    assert ParamLayout.of(_convnet(num_classes=classes)).num_params == expected


def test_convnet_parameter_names_match_mtt_order():
    names = [n for n, _ in ParamLayout.of(_convnet()).as_list()]
    assert names == ["features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias",
                     "features.4.weight", "features.4.bias", "features.5.weight", "features.5.bias",
                     "features.8.weight", "features.8.bias", "features.9.weight", "features.9.bias",
                     "classifier.weight", "classifier.bias"]
    layout = dict(ParamLayout.of(_convnet()).as_list())
    assert layout["classifier.weight"] == [10, 2048]
    assert layout["features.0.weight"] == [128, 3, 3, 3]


@pytest.mark.parametrize("channels, size, depth, model, feat", [
    (3, (32, 32), 3, "convnet", 2048),
    (1, (28, 28), 3, "convnet", 2048),  # MTT's padding-3 first conv: 28 -> 32
    (1, (8, 8), 2, "convnet_d2", 512),
    (1, (8, 8), 3, "convnet", 128),
    (3, (64, 64), 4, "convnet_d4", 2048),
])
def test_convnet_output_shapes(channels, size, depth, model, feat):
    torch.manual_seed(0)
    net = build_model(model, channels=channels, num_classes=7, image_size=size)
    assert model_spec(model)["depth"] == depth
    assert net.classifier.in_features == feat
    assert net(torch.randn(2, channels, *size)).shape == (2, 7)


def test_first_padding_only_for_mnist_like_inputs():
    assert _convnet(channels=1, image_size=(28, 28)).features[0].padding == (3, 3)
    assert _convnet(channels=1, image_size=(32, 32)).features[0].padding == (1, 1)
    assert _convnet(channels=3, image_size=(28, 28)).features[0].padding == (1, 1)


def test_too_deep_for_image_raises():
    with pytest.raises(ValueError, match="depth"):
        _convnet(channels=1, image_size=(8, 8), depth=4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registry_model_forwards(name):
    torch.manual_seed(0)
    net = build_model(name, channels=3, num_classes=5, image_size=(32, 32))
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("norm, act, pool", [("batchnorm", "leakyrelu", "maxpool"), ("layernorm", "gelu", "none"),
                                             ("groupnorm", "sigmoid", "avgpool"), ("none", "relu", "avgpool")])
def test_convnet_variants(norm, act, pool):
    net = _convnet(width=16, depth=2, norm=norm, act=act, pool=pool)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert has_buffers(net) == (norm == "batchnorm")


def test_keyword_only_constructors():
    with pytest.raises(TypeError):
        ConvNet(3, 10, (32, 32))
    for name in ("resnet18", "vgg11", "alexnet"):
        with pytest.raises(TypeError):
            MODELS[name](3, 10, (32, 32))


def test_model_spec_resolves_and_rejects():
    assert model_spec("convnet") == {"name": "convnet", "width": 128, "depth": 3, "norm": "instancenorm",
                                     "act": "relu", "pool": "avgpool"}
    assert model_spec("convnet", width=64)["width"] == 64
    assert model_spec("vgg11_bn")["norm"] == "batchnorm"
    with pytest.raises(ValueError, match="convnet_d4"):
        model_spec("convnet9")
    with pytest.raises(ValueError, match="width"):
        model_spec("convnet", widht=64)
    with pytest.raises(ValueError, match="instancenorm"):
        build_model({"name": "convnet", "norm": "bogus"}, channels=3, num_classes=10, image_size=(32, 32))


def test_build_model_from_spec_dict():
    net = build_model(model_spec("convnet", width=32, depth=2), channels=3, num_classes=10, image_size=(32, 32))
    assert net.classifier.in_features == 32 * 8 * 8


def test_has_buffers():
    assert not has_buffers(_convnet())
    assert has_buffers(build_model("resnet18", channels=3, num_classes=10, image_size=(32, 32)))
    assert not has_buffers(build_model("alexnet", channels=3, num_classes=10, image_size=(32, 32)))


def test_min_train_batch_and_too_small_images():
    from mttlss.models import min_train_batch

    assert [min_train_batch(build_model(n, channels=3, num_classes=2, image_size=(32, 32)))
            for n in ("convnet", "resnet18_bn", "vgg11", "vgg11_bn", "alexnet")] == [1, 2, 1, 2, 1]
    for name in ("vgg11", "vgg11_bn"):  # instance norm over a 1x1 map, or a map pooled away: the same sentence
        with pytest.raises(ValueError, match=r"image_size \(8, 8\) is too small.*fewer pooling layers"):
            build_model(name, channels=1, num_classes=10, image_size=(8, 8))
    assert build_model("vgg11", channels=1, num_classes=10, image_size=(28, 28))(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 7, 9), (3, 6, 4)])
def test_avgpool2x2_is_avg_pool2d_to_every_derivative_order(shape):
    """Even maps take the strided-sum form, odd ones avg_pool2d (floor mode): the same values, and first and second
    derivatives that gradcheck against finite differences (the matching unroll differentiates twice)."""
    pool = AvgPool2x2()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(pool(x), F.avg_pool2d(x, 2, 2), rtol=1e-15, atol=1e-15)
    assert torch.autograd.gradcheck(pool, (x,)) and torch.autograd.gradgradcheck(pool, (x,))
    batched = torch.randn(4, *shape, dtype=torch.float64)  # torch.func.vmap: one batch dimension more
    torch.testing.assert_close(torch.vmap(pool)(batched), torch.stack([F.avg_pool2d(b, 2, 2) for b in batched]))


def test_avgpool2x2_takes_its_own_form_where_it_applies_and_avg_pool2d_elsewhere():
    """The strided sum (and the repeat as its derivative) for plain even float32/64 maps; avg_pool2d, and its
    errors, for everything else; forward mode and vmap over a gradient agree with avg_pool2d's."""
    pool = AvgPool2x2()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    y = pool(x)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    assert type(y.grad_fn).__name__ == "_MeanPool2x2Backward" and type(g.grad_fn).__name__ == "_Repeat2x2Backward"
    others = [x.detach().to(torch.bfloat16), x.detach().float().to(memory_format=torch.channels_last),
              x.detach()[..., ::2][..., :4], x.detach()[..., :7, :]]
    for other in others:
        other.requires_grad_(True)
        assert type(pool(other).grad_fn).__name__ == "AvgPool2DBackward0"
        torch.testing.assert_close(pool(other), F.avg_pool2d(other, 2, 2))
    with pytest.raises(RuntimeError):  # as nn.AvgPool2d: 2-D pooling of a 5-D tensor is refused
        pool(torch.randn(1, 2, 3, 8, 8))
    changed = AvgPool2x2()
    changed.padding = 1
    torch.testing.assert_close(changed(x), F.avg_pool2d(x, 2, 2, padding=1))
    t = torch.randn_like(x)
    torch.testing.assert_close(torch.func.jvp(pool, (x.detach(),), (t,))[1], F.avg_pool2d(t, 2, 2), rtol=1e-15, atol=1e-15)
    grad_of = lambda p: torch.func.vmap(torch.func.grad(lambda z: p(z).square().sum()))  # noqa: E731
    batched = torch.randn(4, 2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(grad_of(pool)(batched), grad_of(nn.AvgPool2d(2, 2))(batched), rtol=1e-15, atol=1e-15)


def test_convnet_pools_with_avgpool2x2_and_keeps_the_reference_module_layout():
    net = _convnet(width=8, depth=3)
    pools = [m for m in net.features if isinstance(m, nn.AvgPool2d)]
    assert len(pools) == 3 and all(type(m) is AvgPool2x2 for m in pools)
    assert [type(m) for m in net.features][:4] == [nn.Conv2d, nn.GroupNorm, nn.ReLU, AvgPool2x2]
    assert type(_convnet(width=8, depth=1, pool="maxpool").features[3]) is nn.MaxPool2d
