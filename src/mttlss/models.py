"""Networks used for experts, matching and evaluation, a small registry, and their flat parameter layout.

The default is ConvNet-3 (method.md section 4). Its module structure and parameter order follow the
reference MTT ConvNet, so trajectories saved by mtt-distillation (flat per-epoch parameter lists in
`named_parameters` order) can be imported unchanged. ``ParamLayout`` / ``flatten_params`` are that order:
how an expert trajectory stores a network as one vector [P], and how matching cuts a vector back into the
named tensors ``torch.func.functional_call`` takes.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTS = ("relu", "leakyrelu", "sigmoid", "gelu")
POOLS = ("avgpool", "maxpool", "none")


def _check_choice(kind: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {list(allowed)}")


def _norm(name: str, channels: int) -> nn.Module:
    _check_choice("norm", name, NORMS)
    if name == "instancenorm":
        # Instance norm as GroupNorm with one group per channel: affine per channel, no running stats,
        # so the network stays a pure function of its parameters (what functional matching needs).
        return nn.GroupNorm(channels, channels, affine=True)
    if name == "batchnorm":
        return nn.BatchNorm2d(channels, affine=True)
    if name == "layernorm":
        # MTT uses nn.LayerNorm over [C, H, W], whose affine shape depends on the image size.
        # This is the channel-wise variant (one group over all channels, per-channel affine), which
        # keeps parameter shapes independent of the resolution.
        return nn.GroupNorm(1, channels, affine=True)
    if name == "groupnorm":
        return nn.GroupNorm(4, channels, affine=True)
    raise ValueError("norm 'none' has no module")  # callers skip the module for 'none'


def _act(name: str) -> nn.Module:
    _check_choice("act", name, ACTS)
    # Not in-place: the matching loss differentiates through the unrolled student (create_graph),
    # and in-place activations save little memory at these sizes.
    return {"relu": nn.ReLU, "leakyrelu": lambda: nn.LeakyReLU(0.01), "sigmoid": nn.Sigmoid,
            "gelu": nn.GELU}[name]()


class _MeanPool2x2(torch.autograd.Function):
    """[..., H, W] -> [..., H/2, W/2] (H, W even): each 2x2 block's mean, from four strided slices. Its backward is
    _Repeat2x2, whose backward is this again, so every derivative order is one of the two."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x[..., 0::2, :] + x[..., 1::2, :]                # [..., H/2, W]
        return (rows[..., 0::2] + rows[..., 1::2]).mul_(0.25)   # [..., H/2, W/2]

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _Repeat2x2.apply(grad)

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:   # linear: the tangent is pooled alike (forward mode)
        return _MeanPool2x2.apply(tangent)


class _Repeat2x2(torch.autograd.Function):
    """[..., h, w] -> [..., 2h, 2w]: each value a quarter of itself, repeated over its 2x2 block (the adjoint of
    _MeanPool2x2)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad: torch.Tensor) -> torch.Tensor:
        # columns first, then whole rows: one expand over both axes copies with a stride-0 innermost axis of
        # length 2, about twice as slow on the CPU (at [10, 128, 16, 16], 1.5 against 0.8 ms)
        *lead, h, w = grad.shape
        cols = (grad * 0.25)[..., None].expand(*lead, h, w, 2).reshape(*lead, h, 1, 2 * w)   # [..., h, 1, 2w]
        return cols.expand(*lead, h, 2, 2 * w).reshape(*lead, 2 * h, 2 * w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _MeanPool2x2.apply(grad)

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        return _Repeat2x2.apply(tangent)


class AvgPool2x2(nn.AvgPool2d):
    """nn.AvgPool2d(2, 2) whose derivatives, of every order, are one strided sum or one repeat: [N, C, H, W] ->
    [N, C, H/2, W/2].

    The same values to float rounding (the four terms are summed in another order) and the same module for
    everything else (an nn.AvgPool2d, no parameters). avg_pool2d's backward, and that backward's own backward
    (the matching unroll differentiates twice), are slower on the CPU: measured side by side in
    benchmarks/results/speed_cpu_forms_2026-12-02.md. Everything but that form takes avg_pool2d itself: odd
    sizes (floor mode), inputs that are not [C, H, W] or [N, C, H, W], channels-last or otherwise strided
    layouts, reduced precision (avg_pool2d sums bf16/fp16 in fp32 and rounds once), and changed settings.
    """

    def __init__(self):
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._strided_sum(x):
            return _MeanPool2x2.apply(x)
        return super().forward(x)

    def _strided_sum(self, x: torch.Tensor) -> bool:
        plain = (self.kernel_size in (2, (2, 2)) and self.stride in (2, (2, 2)) and self.padding in (0, (0, 0))
                 and self.divisor_override is None)
        return (plain and x.dim() in (3, 4) and x.dtype in (torch.float32, torch.float64)
                and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0 and x.stride(-1) == 1)


def _pool(name: str) -> nn.Module:
    _check_choice("pool", name, POOLS)
    return AvgPool2x2() if name == "avgpool" else nn.MaxPool2d(2, 2)


def _is_mnist_like(channels: int, image_size: tuple[int, int]) -> bool:
    # MTT quirk: 1-channel 28x28 inputs get a wider first padding so that 28 -> 32 and the rest of the
    # network sees CIFAR-sized maps. We keep it only for that exact case.
    return channels == 1 and tuple(image_size) == (28, 28)


@torch.no_grad()
def _feature_dim(features: nn.Module, channels: int, image_size: tuple[int, int]) -> int:
    """Flattened output size of `features`, by a dry run in eval mode (BatchNorm stats untouched)."""
    was_training = features.training
    features.eval()
    try:
        out = features(torch.zeros(1, channels, *image_size))
    except (RuntimeError, ValueError) as err:  # a map pooled to nothing; instance norm over a single 1x1 value
        raise ValueError(f"image_size {tuple(image_size)} is too small for this network (its pooling layers shrink "
                         "the maps to 1x1 or less); use larger images or a network with fewer pooling layers "
                         "(e.g. convnet, alexnet or resnet18_bn for 8x8 images)") from err
    finally:
        features.train(was_training)
    return out[0].numel()


# ---------------------------------------------------------------------------------------------------
# ConvNet (the default network of the field)
# ---------------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """[conv3x3 -> norm -> act -> pool] x depth -> linear. Default: ConvNet-3, 320,010 params on CIFAR-10."""

    def __init__(self, *, channels: int, num_classes: int, image_size: tuple[int, int], width: int = 128,
                 depth: int = 3, norm: str = "instancenorm", act: str = "relu", pool: str = "avgpool"):
        super().__init__()
        _check_choice("norm", norm, NORMS)
        _check_choice("act", act, ACTS)
        _check_choice("pool", pool, POOLS)
        if depth < 1 or width < 1:
            raise ValueError(f"ConvNet needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
        h, w = image_size
        first_pad = 3 if _is_mnist_like(channels, image_size) else 1
        layers: list[nn.Module] = []
        in_ch = channels
        for d in range(depth):
            pad = first_pad if d == 0 else 1
            layers.append(nn.Conv2d(in_ch, width, kernel_size=3, padding=pad))
            h, w = h + 2 * pad - 2, w + 2 * pad - 2
            if norm != "none":
                layers.append(_norm(norm, width))
            layers.append(_act(act))
            if pool != "none":
                layers.append(_pool(pool))
                h, w = h // 2, w // 2
            in_ch = width
        if h < 1 or w < 1:
            raise ValueError(f"image_size {tuple(image_size)} vanishes after {depth} pooling layers; "
                             "use a smaller depth or pool='none'")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, C, H, W], training space
        return self.classifier(self.features(x).flatten(1))


# ---------------------------------------------------------------------------------------------------
# Cross-architecture networks (compact versions of those used in the DD literature)
# ---------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs, identity or 1x1-conv shortcut."""

    def __init__(self, *, in_planes: int, planes: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = _norm(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          _norm(norm, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with a CIFAR stem (3x3 conv, stride 1, no max-pool), global average pool, linear."""

    def __init__(self, *, channels: int, num_classes: int, image_size: tuple[int, int], norm: str = "batchnorm"):
        super().__init__()
        _check_choice("norm", norm, tuple(n for n in NORMS if n != "none"))
        self.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = _norm(norm, 64)
        blocks, in_planes = [], 64
        for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layer = nn.Sequential(BasicBlock(in_planes=in_planes, planes=planes, stride=stride, norm=norm),
                                  BasicBlock(in_planes=planes, planes=planes, stride=1, norm=norm))
            blocks.append(layer)
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        # Adaptive pooling equals the reference's avg_pool2d(4) on 32x32 and also works at 64x64.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.classifier(self.pool(out).flatten(1))


_VGG11_CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG11(nn.Module):
    """VGG-11 (conv3x3 -> norm -> ReLU, max-pools), as in MTT's cross-architecture table."""

    def __init__(self, *, channels: int, num_classes: int, image_size: tuple[int, int], norm: str = "instancenorm"):
        super().__init__()
        _check_choice("norm", norm, NORMS)
        first_pad = 3 if _is_mnist_like(channels, image_size) else 1
        layers: list[nn.Module] = []
        in_ch = channels
        for v in _VGG11_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(in_ch, v, 3, padding=first_pad if not layers else 1))
            if norm != "none":
                layers.append(_norm(norm, v))
            layers.append(nn.ReLU())
            in_ch = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(_feature_dim(self.features, channels, image_size), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class AlexNet(nn.Module):
    """The small CIFAR AlexNet of the DD literature (5 convs, 3 max-pools, one linear layer)."""

    def __init__(self, *, channels: int, num_classes: int, image_size: tuple[int, int]):
        super().__init__()
        first_pad = 4 if _is_mnist_like(channels, image_size) else 2  # 28 -> 32, as for ConvNet
        self.features = nn.Sequential(
            nn.Conv2d(channels, 128, 5, padding=first_pad), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(192, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 192, 3, padding=1), nn.ReLU(),
            nn.Conv2d(192, 192, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        self.classifier = nn.Linear(_feature_dim(self.features, channels, image_size), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


# ---------------------------------------------------------------------------------------------------
# registry and specs
# ---------------------------------------------------------------------------------------------------

# Each entry is called as MODELS[name](channels=..., num_classes=..., image_size=..., **options).
# The options and their defaults come from the constructor signature (one source of truth).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "convnet": ConvNet,
    "convnet_d1": functools.partial(ConvNet, depth=1),
    "convnet_d2": functools.partial(ConvNet, depth=2),
    "convnet_d4": functools.partial(ConvNet, depth=4),  # for 64x64 inputs (Tiny ImageNet)
    "convnet_d5": functools.partial(ConvNet, depth=5),
    "resnet18": ResNet18,
    "resnet18_bn": ResNet18,
    "vgg11": VGG11,
    "vgg11_bn": functools.partial(VGG11, norm="batchnorm"),
    "alexnet": AlexNet,
}

_DATA_ARGS = ("channels", "num_classes", "image_size")


def _options(name: str) -> dict:
    sig = inspect.signature(MODELS[name])
    return {k: p.default for k, p in sig.parameters.items() if k not in _DATA_ARGS}


def model_spec(name: str, **overrides) -> dict:
    """Fully resolved, JSON-able spec: {"name": ..., **options}; unknown name or key -> ValueError."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    spec = _options(name)
    unknown = sorted(set(overrides) - set(spec))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; valid options: {sorted(spec)}")
    spec.update(overrides)
    return {"name": name, **spec}


def build_model(spec: dict | str, *, channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    """Build a network from a spec (as returned by `model_spec`) or a registry name."""
    if isinstance(spec, str):
        spec = model_spec(spec)
    if "name" not in spec:
        raise ValueError(f"model spec {spec!r} has no 'name'; build it with model_spec(name, ...)")
    options = {k: v for k, v in spec.items() if k != "name"}
    resolved = model_spec(spec["name"], **options)
    resolved.pop("name")
    return MODELS[spec["name"]](channels=channels, num_classes=num_classes,
                                image_size=tuple(image_size), **resolved)


# ---------------------------------------------------------------------------------------------------
# flat parameter vectors: how expert trajectories are stored and how matching unrolls a student
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ParamLayout:
    """Names and shapes of a model's parameters, in ``named_parameters()`` order: the layout of a flat vector [P]."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> "ParamLayout":
        named = list(model.named_parameters())
        return cls(names=tuple(n for n, _ in named), shapes=tuple(tuple(p.shape) for _, p in named))

    @property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def num_params(self) -> int:
        return sum(self.numels)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into ``flat`` [P]; gradients w.r.t. the views flow back to ``flat``."""
        if flat.numel() != self.num_params:
            raise ValueError(
                f"a flat parameter vector of {flat.numel()} values does not fit this network "
                f"({self.num_params} parameters): the experts were trained with another architecture"
            )
        chunks = torch.split(flat, self.numels)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def as_list(self) -> list[list]:
        """[[name, shape], ...]: the JSON form stored in an experts manifest."""
        return [[n, list(s)] for n, s in zip(self.names, self.shapes)]


def flatten_params(model: nn.Module) -> torch.Tensor:
    """The model's parameters as one detached flat vector [P], in ``ParamLayout.of(model)`` order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def min_train_batch(model: nn.Module) -> int:
    """The smallest batch ``model`` can train on: 2 with BatchNorm (its batch statistics need more than one value
    per channel, and one 8x8 image reaches ResNet-18's last stage as a single 1x1 value), else 1."""
    return 2 if any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) for m in model.modules()) else 1


def has_buffers(model: nn.Module) -> bool:
    """True when the model carries state besides parameters (BatchNorm running stats)."""
    return any(True for _ in model.buffers())
