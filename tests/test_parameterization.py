"""Tests for mttlss.parameterization: budget arithmetic (method.md 5.3) and the synthetic sets."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import random_set
from mttlss.labels import stored_label_floats
from mttlss.parameterization import (
    Budget,
    BudgetError,
    LowRankSet,
    PixelSet,
    budget_report,
    build_synthetic_set,
    solve_budget,
)

CIFAR = (3, 32, 32)


def n_per_class(**kw) -> int | str:
    try:
        return solve_budget(image_shape=CIFAR, **kw).images_per_class
    except BudgetError:
        return "-"


# ---------------------------------------------------------------- budget: method.md 5.3 tables


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("ipc, expected", [
    (1, [192, 48, 64, 8, "-", "-"]),
    (10, [2496, 624, 1216, 152, 576, 36]),
    (50, [12736, 3184, 6336, 792, 3136, 196]),
])
def test_budget_table_labels_not_counted(num_classes, ipc, expected):
    got = [n_per_class(num_classes=num_classes, ipc=ipc, rank=r, code=c)
           for r in (4, 8, 16) for c in ("diag", "full")]
    assert got == expected


@pytest.mark.parametrize("num_classes, ipc, expected", [
    (10, 1, [104, 39, 45, 7, "-"]),
    (10, 10, [1361, 516, 858, 144, 35]),
    (100, 1, [20, 15, 12, 5, "-"]),
    (100, 10, [267, 202, 235, 99, 31]),
])
def test_budget_table_labels_counted(num_classes, ipc, expected):
    settings = [(4, "diag"), (4, "full"), (8, "diag"), (8, "full"), (16, "full")]
    got = [n_per_class(num_classes=num_classes, ipc=ipc, rank=r, code=c, count_labels=True) for r, c in settings]
    assert got == expected


def test_budget_counts_compact_labels_at_their_stored_size():
    # CIFAR-10, IPC 1, r = 4 full, one subspace per class: 30720 - 7680 mapper floats = 23040 for 10 x n images of
    # 48 code floats + L label floats: L = 10 (float32, all classes) -> 39, 5 (float16) -> 43, 1.5 (float32 top-1:
    # a value and an int16 index) -> 46, 1 (float16 top-1) -> 47 images per class
    kw = dict(num_classes=10, image_shape=CIFAR, ipc=1, rank=4, code="full", subspaces="per_class", count_labels=True)
    stored = [("float32", None), ("float16", None), ("float32", 1), ("float16", 1)]
    sizes = [stored_label_floats(num_classes=10, dtype=dtype, topk=topk) for dtype, topk in stored]
    assert sizes == [10, 5, 1.5, 1]
    assert [solve_budget(**kw, label_floats_per_image=L).images_per_class for L in sizes] == [39, 43, 46, 47]
    assert solve_budget(**kw).images_per_class == 39  # None: float32 logits of every class, as before
    b = solve_budget(**kw, label_floats_per_image=1.5)
    assert b.label_floats == 46 * 10 * 1.5 and b.stored_floats(with_labels=True) <= b.budget_floats
    half = solve_budget(num_classes=3, image_shape=CIFAR, ipc=1, param="pixel", label_floats_per_image=1.5)
    assert half.label_floats == 4.5  # float16 logits of 3 classes: 3 images x 1.5
    report = budget_report(**kw, label_floats_per_image=1)
    assert re.search(r"4 \*\s+full\s+48\s+\d+\s+47\s+30710$", report, re.MULTILINE), report
    assert "soft labels (1 float per image, as stored)" in report
    with pytest.raises(ValueError, match="label_floats_per_image must be positive"):
        solve_budget(**kw, label_floats_per_image=0)


def test_budget_two_subspaces_per_class_ipc1():
    assert n_per_class(num_classes=10, ipc=1, rank=4, code="diag", num_subspaces=2) == 128
    assert n_per_class(num_classes=10, ipc=1, rank=4, code="full", num_subspaces=2) == 32
    for code in ("diag", "full"):
        assert n_per_class(num_classes=10, ipc=1, rank=8, code=code, num_subspaces=2) == "-"


def test_budget_shared_mapper_cifar10():
    b = solve_budget(num_classes=10, image_shape=CIFAR, ipc=1, rank=4, code="full", subspaces="shared",
                     num_subspaces=1)
    assert b.images_per_class == 62
    assert b.mapper_floats == 3 * 64 * 4
    assert b.code_floats == 62 * 10 * 48
    assert b.stored_floats(with_labels=False) <= b.budget_floats == 30720


def test_budget_fields_cap_and_pixel():
    b = solve_budget(num_classes=10, image_shape=CIFAR, ipc=10, rank=8, code="full", max_images_per_class=100)
    assert b.images_per_class == 100
    assert b.label_floats == 100 * 10 * 10
    assert b.stored_floats(with_labels=True) == b.mapper_floats + b.code_floats + b.label_floats
    assert Budget(**b.as_dict()) == b
    json.dumps(b.as_dict())
    p = solve_budget(num_classes=10, image_shape=CIFAR, ipc=10, param="pixel")
    assert (p.images_per_class, p.mapper_floats, p.code_floats) == (10, 0, 10 * 10 * 3072)


def test_budget_error_names_largest_rank():
    with pytest.raises(BudgetError, match=r"[Ll]argest feasible rank: 13.*--rank 13"):
        solve_budget(num_classes=10, image_shape=CIFAR, ipc=1, rank=16, code="full")
    assert n_per_class(num_classes=10, ipc=1, rank=13, code="full") >= 1
    assert n_per_class(num_classes=10, ipc=1, rank=14, code="full") == "-"
    # Nothing fits at any rank: the message says what else to change.
    with pytest.raises(BudgetError, match="subspaces=shared") as exc:
        solve_budget(num_classes=10, image_shape=(3, 4, 4), ipc=1, rank=2, num_subspaces=8, count_labels=True)
    assert "largest feasible rank: none" in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_budget_validation_messages():
    with pytest.raises(ValueError, match="full, diag"):
        solve_budget(num_classes=10, image_shape=CIFAR, ipc=1, code="tucker")
    with pytest.raises(ValueError, match="min\\(H, W\\)"):
        solve_budget(num_classes=10, image_shape=CIFAR, ipc=50, rank=33)
    with pytest.raises(ValueError, match="per_class, shared"):
        solve_budget(num_classes=10, image_shape=CIFAR, ipc=1, subspaces="global")


def test_budget_report_table():
    text = budget_report(num_classes=10, image_shape=CIFAR, ipc=1, rank=4, code="full")
    rows = {tuple(line.split()[:2]): line.split() for line in text.splitlines()}
    assert rows[("4", "*")][2:] == ["full", "48", str(30720), "39", str(768 * 10 + 39 * 10 * (48 + 10))]
    assert rows[("16", "full")][2:] == ["-", "-", "-", "-"]
    assert rows[("8", "diag")][2] == "64" and rows[("8", "diag")][4] == "45"
    assert "pixel" in budget_report(num_classes=10, image_shape=CIFAR, ipc=1, param="pixel")


# ---------------------------------------------------------------- LowRankSet decoding

SMALL = (3, 8, 10)


def _random_set(seed=0, **kw) -> LowRankSet:
    return random_set(LowRankSet, seed=seed, **kw)


@pytest.mark.parametrize("code", ["full", "diag"])
@pytest.mark.parametrize("subspaces, num_subspaces", [("per_class", 1), ("per_class", 2), ("shared", 3)])
@pytest.mark.parametrize("share_channels", [False, True])
def test_lowrank_shapes_rank_and_indexing(code, subspaces, num_subspaces, share_channels):
    s = _random_set(code=code, subspaces=subspaces, num_subspaces=num_subspaces, share_channels=share_channels)
    k = num_subspaces * 3 if subspaces == "per_class" else num_subspaces
    cm = 1 if share_channels else 3
    assert tuple(s.mappers_U.shape) == (k, cm, 8, 2) and tuple(s.mappers_V.shape) == (k, cm, 10, 2)
    assert tuple(s.codes.shape) == ((12, 3, 2, 2) if code == "full" else (12, 3, 2))
    assert set(s.state_dict()) == {"mappers_U", "mappers_V", "codes"}
    x = s.decode()
    assert tuple(x.shape) == (12, *SMALL)
    ranks = torch.linalg.matrix_rank(x.detach())  # [12, 3] per image and channel; float32 tolerance
    assert int(ranks.max()) <= 2 and int(ranks.min()) >= 1
    idx = torch.tensor([7, 0, 11, 7])
    torch.testing.assert_close(s.decode(idx), x[idx])
    # stored floats = factor numels = the budget's mapper + code floats
    assert s.stored_floats() == sum(p.numel() for p in s.parameters())
    assert s.num_images == 12 and s.images_per_class == 4
    assert s.labels_hard().tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_lowrank_stored_floats_matches_budget():
    for kw in [dict(rank=4, code="full"), dict(rank=8, code="diag"),
               dict(rank=4, code="full", subspaces="shared", num_subspaces=2, share_channels=True)]:
        b = solve_budget(num_classes=10, image_shape=CIFAR, ipc=1, **kw)
        s = LowRankSet(num_classes=10, image_shape=CIFAR, images_per_class=b.images_per_class, **kw)
        assert s.stored_floats() == b.mapper_floats + b.code_floats <= b.budget_floats


def test_fixed_subspace_assignment():
    s = LowRankSet(num_classes=2, image_shape=SMALL, images_per_class=3, rank=2, num_subspaces=2)
    assert s.subspace_of.tolist() == [0, 1, 0, 2, 3, 2]
    s = LowRankSet(num_classes=2, image_shape=SMALL, images_per_class=3, rank=2, subspaces="shared",
                   num_subspaces=2)
    assert s.subspace_of.tolist() == [0, 1, 0, 0, 1, 0]


def test_decode_matches_explicit_formula():
    s = _random_set(code="diag", subspaces="shared", num_subspaces=2)
    x = s.decode()
    i, c = 5, 1
    k = int(s.subspace_of[i])
    ref = s.mappers_U[k, c] @ torch.diag(s.codes[i, c]) @ s.mappers_V[k, c].T
    torch.testing.assert_close(x[i, c], ref)


def test_gradients_reach_all_factors():
    s = _random_set(num_subspaces=2)
    s.decode(torch.tensor([0, 1, 5])).square().sum().backward()
    for name in ("mappers_U", "mappers_V", "codes"):
        g = getattr(s, name).grad
        assert g is not None and g.abs().sum() > 0, name
    assert s.codes.grad[2].abs().sum() == 0  # image 2 was not decoded
    groups = s.parameter_groups()
    assert groups["codes"][0] is s.codes and groups["mappers"] == [s.mappers_U, s.mappers_V]
    # A freshly constructed set is not a dead point: codes get gradients.
    fresh = LowRankSet(num_classes=2, image_shape=SMALL, images_per_class=2, rank=2)
    (fresh.decode() - 1).square().sum().backward()
    assert fresh.codes.grad.abs().sum() > 0


@pytest.mark.parametrize("subspaces, num_subspaces", [("per_class", 3), ("shared", 4)])
def test_random_pairing_deterministic_and_allowed(subspaces, num_subspaces):
    s = _random_set(subspaces=subspaces, num_subspaces=num_subspaces, pairing="random", images_per_class=5)
    idx = torch.arange(s.num_images)
    a = s.subspaces_for(idx, generator=torch.Generator().manual_seed(3))
    b = s.subspaces_for(idx, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    draws = torch.stack([s.subspaces_for(idx, generator=torch.Generator().manual_seed(t)) for t in range(20)])
    if subspaces == "per_class":
        cls = idx // 5
        assert bool(((draws >= cls * 3) & (draws < cls * 3 + 3)).all())
    else:
        assert bool(((draws >= 0) & (draws < 4)).all())
    assert not bool((draws == s.subspace_of).all())  # pairing really varies
    assert len(torch.unique(draws)) == s.total_subspaces
    torch.testing.assert_close(s.decode(idx, generator=torch.Generator().manual_seed(3)),
                               s.decode(idx, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(s.decode(idx), s.decode(idx))  # no generator: fixed pairing
    x0 = s.decode(idx)
    k = s.subspace_of
    torch.testing.assert_close(x0, s._compose(s.mappers_U[k], s.codes, s.mappers_V[k]))


def test_validation_messages():
    base = dict(num_classes=2, image_shape=SMALL, images_per_class=2)
    with pytest.raises(ValueError, match="full, diag"):
        LowRankSet(**base, rank=2, code="cp")
    with pytest.raises(ValueError, match="min\\(H, W\\) = 8"):
        LowRankSet(**base, rank=9)
    with pytest.raises(ValueError, match="fixed, random"):
        LowRankSet(**base, rank=2, pairing="roundrobin")
    with pytest.raises(ValueError, match="1-D integer"):
        LowRankSet(**base, rank=2).decode(torch.tensor([0.5]))


# ---------------------------------------------------------------- initialisation from real images


def _rank_r_data(*, num_classes, per_class, rank, shape, seed=0, share=False):
    """Real images whose classes each live exactly in a 2-D rank-r subspace (shared U, V per class)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    xs, ys = [], []
    for k in range(num_classes):
        cm = 1 if share else c
        a = torch.randn(cm, h, rank, generator=g).expand(c, h, rank)
        b = torch.randn(cm, w, rank, generator=g).expand(c, w, rank)
        s = torch.randn(per_class, c, rank, rank, generator=g)
        xs.append(torch.einsum("chr,ncrs,cws->nchw", a, s, b))
        ys.append(torch.full((per_class,), k))
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("share_channels", [False, True])
def test_from_real_exact_on_rank_r_images(share_channels):
    x, y = _rank_r_data(num_classes=3, per_class=6, rank=2, shape=SMALL, share=share_channels)
    s, info = LowRankSet.from_real(x, y, num_classes=3, images_per_class=4, rank=2, share_channels=share_channels,
                                   generator=torch.Generator().manual_seed(0))
    assert info["relative_reconstruction_error"] < 1e-5
    # Each decoded image equals one real image of its own class.
    dec = s.decode()
    for i in range(s.num_images):
        dist = (x - dec[i]).flatten(1).norm(dim=1)
        j = int(dist.argmin())
        assert dist[j] < 1e-4 and int(y[j]) == i // 4
    # Orthonormal mappers
    u = s.mappers_U
    torch.testing.assert_close(u.transpose(-1, -2) @ u, torch.eye(2).expand_as(u.transpose(-1, -2) @ u),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("code, subspaces, num_subspaces",
                         [("full", "per_class", 1), ("diag", "per_class", 2), ("full", "shared", 2)])
def test_from_real_error_decreases_with_rank(code, subspaces, num_subspaces):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 3, 8, 8, generator=g)  # square, so r = 8 spans both axes
    y = torch.arange(3).repeat_interleave(10)
    errs = []
    for r in (1, 2, 4, 8):
        _, info = LowRankSet.from_real(x, y, num_classes=3, images_per_class=6, rank=r, code=code,
                                       subspaces=subspaces, num_subspaces=num_subspaces,
                                       generator=torch.Generator().manual_seed(0))
        errs.append(info["relative_reconstruction_error"])
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[0] < 1.0
    if code == "full":
        assert errs[-1] < 1e-5  # r = H = W with a full core reproduces the images


def test_from_real_shared_uses_all_classes():
    # shared subspaces: subspace k is fitted on images of every class assigned to it
    x, y = _rank_r_data(num_classes=1, per_class=12, rank=2, shape=SMALL)
    y = torch.arange(3).repeat(4)  # same rank-2 subspace, three labels
    s, info = LowRankSet.from_real(x, y, num_classes=3, images_per_class=4, rank=2, subspaces="shared")
    assert s.total_subspaces == 1 and info["relative_reconstruction_error"] < 1e-5


def test_from_real_repeats_when_class_too_small():
    x = torch.randn(6, *SMALL)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    s, info = LowRankSet.from_real(x, y, num_classes=2, images_per_class=5, rank=2,
                                   generator=torch.Generator().manual_seed(0))
    assert info["repeated_images"] == 4 and s.num_images == 10


# ---------------------------------------------------------------- serialisation


@pytest.mark.parametrize("kind", ["pixel", "lowrank_full", "lowrank_diag_shared"])
def test_describe_build_round_trip(kind):
    if kind == "pixel":
        s = PixelSet(num_classes=3, image_shape=SMALL, images_per_class=2)
        with torch.no_grad():
            s.images.normal_()
    elif kind == "lowrank_full":
        s = _random_set(num_subspaces=2, pairing="random")
    else:
        s = _random_set(code="diag", subspaces="shared", num_subspaces=3, share_channels=True)
    d = json.loads(json.dumps(s.describe()))
    assert d["type"] == ("pixel" if kind == "pixel" else "lowrank")
    assert d["num_images"] == s.num_images and d["stored_floats"] == s.stored_floats()
    if kind != "pixel":
        assert d["num_subspaces_total"] == s.total_subspaces == s.mappers_U.shape[0]
    rebuilt = build_synthetic_set(d)
    assert type(rebuilt) is type(s)
    assert not torch.equal(rebuilt.decode(), s.decode())
    rebuilt.load_state_dict(s.state_dict())
    torch.testing.assert_close(rebuilt.decode(), s.decode(), rtol=0, atol=0)
    assert rebuilt.describe() == s.describe()
    with pytest.raises(ValueError, match="valid: pixel, lowrank"):
        build_synthetic_set({**d, "type": "fred"})
    if kind != "pixel":
        with pytest.raises(ValueError, match="do not match"):
            build_synthetic_set({**d, "shapes": {**d["shapes"], "codes": [1]}})


# ---------------------------------------------------------------- PixelSet


def test_pixel_from_real_class_major_and_candidates():
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([2, 0, 1, 0, 2, 1, 0, 1, 2, 0, 1, 2])
    x = torch.arange(12.0).reshape(12, 1, 1, 1).expand(12, *SMALL).clone()  # image i is filled with i
    s = PixelSet.from_real(x, y, num_classes=3, images_per_class=2, generator=g)
    picked = s.images[:, 0, 0, 0].long()
    assert y[picked].tolist() == [0, 0, 1, 1, 2, 2]
    assert len(set(picked.tolist())) == 6
    assert s.labels_hard().tolist() == [0, 0, 1, 1, 2, 2]
    assert tuple(s.decode(torch.tensor([3])).shape) == (1, *SMALL)
    assert s.parameter_groups() == {"images": [s.images]}
    assert s.stored_floats() == 6 * 3 * 8 * 10
    # candidates: class 0 only from {3, 9}; class 1 has one candidate (5) -> it is used, the rest filled
    cand = [torch.tensor([3, 9]), torch.tensor([5]), torch.tensor([0, 4, 8, 11])]
    for seed in range(5):
        s = PixelSet.from_real(x, y, num_classes=3, images_per_class=2, candidates=cand,
                               generator=torch.Generator().manual_seed(seed))
        picked = s.images[:, 0, 0, 0].long().tolist()
        assert sorted(picked[:2]) == [3, 9]
        assert picked[2] == 5 and y[picked[3]] == 1 and picked[3] != 5
        assert set(picked[4:]) <= {0, 4, 8, 11}
    with pytest.raises(ValueError, match="another class"):
        PixelSet.from_real(x, y, num_classes=3, images_per_class=2, candidates=[cand[1], cand[0], cand[2]])
