"""Form B, the vector-subspace parameterisation (method.md 5.2, 5.3 and 5.5): budget, decoding, initialisation,
serialisation, and the pipeline (distill -> artifact -> info / evaluate / export / show) with param=vector."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import mttlss
from conftest import random_set, tiny_distill_config
from mttlss import cli
from mttlss.config import DistillConfig, resolve_config
from mttlss.distillation import distill
from mttlss.experts import ExpertSet
from mttlss.export import export
from mttlss.parameterization import (BudgetError, LowRankSet, VectorSet, _choose_real_indices, budget_report,
                                     build_synthetic_set, solve_budget)
from mttlss.training import EvalRecipe, EpochModeError, check_epoch_mode

CIFAR = (3, 32, 32)
SMALL = (3, 8, 10)


# ---------------------------------------------------------------- budget: method.md 5.3, form B table


@pytest.mark.parametrize("setting, classes, ipc, subspaces, num_subspaces, rank, expected", [
    ("CIFAR-10 / SVHN, IPC 1", 10, 1, "shared", 1, 8, 76),
    ("CIFAR-10 / SVHN, IPC 1", 10, 1, "shared", 2, 8, "infeasible"),
    ("CIFAR-10 / SVHN, IPC 1", 10, 1, "shared", 5, 8, "infeasible"),
    ("CIFAR-100, IPC 1", 100, 1, "shared", 4, 16, 69),
    ("any, IPC 10", 10, 10, "per_class", 1, 8, 768),
    ("any, IPC 10", 100, 10, "per_class", 1, 8, 768),
    ("any, IPC 50", 10, 50, "per_class", 1, 16, 6528),
    ("any, IPC 50", 100, 50, "per_class", 1, 16, 6528),
])
def test_form_b_budget_table(setting, classes, ipc, subspaces, num_subspaces, rank, expected):
    kw = dict(num_classes=classes, image_shape=CIFAR, ipc=ipc, param="vector", rank=rank, subspaces=subspaces,
              num_subspaces=num_subspaces)
    if expected == "infeasible":
        with pytest.raises(BudgetError, match=r"mappers alone take.*num_subspaces=1 with rank 8 \(76 images per class\)"):
            solve_budget(**kw)
        return
    b = solve_budget(**kw)
    assert b.images_per_class == expected, setting
    k = num_subspaces if subspaces == "shared" else classes
    assert b.mapper_floats == k * 3072 * rank and b.code_floats == expected * classes * rank
    assert b.stored_floats(with_labels=False) <= b.budget_floats == ipc * classes * 3072
    # one more image per class would not fit
    assert b.mapper_floats + (expected + 1) * classes * rank > b.budget_floats
    if subspaces == "per_class":  # n = D (IPC - r) / r with one subspace per class
        assert expected == 3072 * (ipc - rank) // rank


def test_form_b_budget_counts_labels_means_and_half_resolution():
    base = dict(num_classes=10, image_shape=CIFAR, ipc=1, param="vector", rank=8, subspaces="shared")
    # labels counted: (30720 - 8 x 3072) / (10 x (8 + 10)) = 34.1; float16 top-1 labels (L = 1): 6144 / 90 = 68.3
    assert solve_budget(**base, count_labels=True).images_per_class == 34
    assert solve_budget(**base, count_labels=True, label_floats_per_image=1).images_per_class == 68
    # a mean per subspace costs D floats: (30720 - 9 x 3072) / 80 = 38.4
    mean = solve_budget(**base, subspace_mean=True)
    assert (mean.images_per_class, mean.mapper_floats) == (38, 9 * 3072)
    # half resolution: D' = 3 x 16 x 16 = 768, (30720 - 8 x 768) / 80 = 307.2
    half = solve_budget(**base, mapper_downsample=2)
    assert (half.images_per_class, half.mapper_floats) == (307, 8 * 768)
    for b, kw in ((mean, dict(subspace_mean=True)), (half, dict(mapper_downsample=2))):
        s = VectorSet(num_classes=10, image_shape=CIFAR, images_per_class=b.images_per_class, rank=8,
                      subspaces="shared", **kw)
        assert s.stored_floats() == b.mapper_floats + b.code_floats <= b.budget_floats
    # per-class subspaces at IPC 1 never fit (r < IPC is needed): the message names the settings that do
    with pytest.raises(BudgetError, match="largest feasible rank: none.*subspaces=shared num_subspaces=1 with rank 8 "
                                          r"\(76 images per class\); mapper_downsample=2 with rank 3"):
        solve_budget(**{**base, "subspaces": "per_class"})
    assert solve_budget(**base, max_images_per_class=50).images_per_class == 50


def test_form_b_budget_report_and_cli(capsys):
    text = budget_report(num_classes=10, image_shape=CIFAR, ipc=1, param="vector", rank=8, subspaces="shared")
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.split()[0].isdigit()}
    assert rows["8"][1:] == ["*", "76", str(24576 + 760 * 8), "34", str(24576 + 340 * 8 + 340 * 10)]
    assert rows["16"][1:] == ["-", "-", "-", "-"]
    assert "param vector (form B), mapper rows D' = 3072 (3x32x32)" in text
    assert cli.main(["budget", "--dataset", "cifar100", "--ipc", "1", "--param", "vector", "--rank", "16",
                     "--subspaces", "shared", "--num-subspaces", "4"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("16 *"))
    assert row.split()[2] == "69", row
    assert cli.main(["budget", "--dataset", "cifar10", "--ipc", "1", "--param", "vector", "--mapper-downsample", "2",
                     "--subspace-mean", "--subspaces", "shared", "--rank", "8"]) == 0
    out = capsys.readouterr().out
    assert "D' = 768 (3x16x16)" in out and "mappers + means + codes" in out
    # form-only knobs are refused with the other form, naming the fix
    assert cli.main(["budget", "--dataset", "cifar10", "--ipc", "1", "--subspace-mean"]) == 2
    assert "subspace_mean=true applies to param=vector only" in capsys.readouterr().err
    assert cli.main(["budget", "--dataset", "cifar10", "--ipc", "1", "--param", "vector", "--code", "diag"]) == 2
    assert "code=diag applies to param=lowrank only" in capsys.readouterr().err


def test_config_knobs_and_their_validation():
    cfg = resolve_config(param="vector", rank=8, subspace_mean=True, mapper_downsample=2)
    assert (cfg.param, cfg.subspace_mean, cfg.mapper_downsample) == ("vector", True, 2)
    assert DistillConfig().subspace_mean is False and DistillConfig().mapper_downsample == 1
    with pytest.raises(ValueError, match="subspace_mean=true applies to param=vector only.*set param=vector"):
        resolve_config(subspace_mean=True)
    with pytest.raises(ValueError, match="mapper_downsample=2 applies to param=vector only"):
        resolve_config(param="pixel", mapper_downsample=2)
    with pytest.raises(ValueError, match="share_channels=true applies to param=lowrank only"):
        resolve_config(param="vector", share_channels=True)
    with pytest.raises(ValueError, match="mapper_downsample must be >= 1"):
        resolve_config(param="vector", mapper_downsample=0)
    resolve_config(param="vector", pairing="random", eval_epoch_mode="repaired")  # repairable, as form A
    with pytest.raises(ValueError, match="set pairing=random"):
        resolve_config(param="vector", eval_epoch_mode="repaired")


# ---------------------------------------------------------------- decoding


def _random_set(seed=0, **kw) -> VectorSet:
    return random_set(VectorSet, seed=seed, **kw)


@pytest.mark.parametrize("subspaces, num_subspaces", [("per_class", 1), ("per_class", 2), ("shared", 3)])
@pytest.mark.parametrize("mean", [False, True])
def test_decode_shape_formula_and_gradients(subspaces, num_subspaces, mean):
    s = _random_set(subspaces=subspaces, num_subspaces=num_subspaces, subspace_mean=mean)
    k = num_subspaces * 3 if subspaces == "per_class" else num_subspaces
    d = 3 * 8 * 10
    assert tuple(s.mappers.shape) == (k, d, 2) and tuple(s.codes.shape) == (12, 2)
    assert set(s.state_dict()) == {"mappers", "codes", *(["means"] if mean else [])}
    x = s.decode()
    assert tuple(x.shape) == (12, *SMALL)
    for i in (0, 5, 11):  # x_i = M_k b_i + mu_k, reshaped to C x H x W
        ki = int(s.subspace_of[i])
        ref = s.mappers[ki] @ s.codes[i] + (s.means[ki] if mean else 0)
        torch.testing.assert_close(x[i], ref.view(SMALL))
    idx = torch.tensor([7, 0, 11, 7])
    torch.testing.assert_close(s.decode(idx), x[idx])
    assert s.decode(torch.tensor([], dtype=torch.long)).shape == (0, *SMALL)
    # subspace assignment is form A's for the same arguments
    a = LowRankSet(num_classes=3, image_shape=SMALL, images_per_class=4, rank=2, subspaces=subspaces,
                   num_subspaces=num_subspaces)
    assert torch.equal(s.subspace_of, a.subspace_of) and s.total_subspaces == a.total_subspaces
    s.decode(torch.tensor([0, 1, 5])).square().sum().backward()
    assert s.codes.grad[[0, 1, 5]].abs().sum() > 0 and s.codes.grad[2].abs().sum() == 0  # image 2 not decoded
    used = s.subspace_of[[0, 1, 5]].unique()
    assert s.mappers.grad[used].abs().sum() > 0
    unused = [j for j in range(k) if j not in used.tolist()]
    assert s.mappers.grad[unused].abs().sum() == 0
    groups = s.parameter_groups()
    assert groups["codes"] == [s.codes] and groups["mappers"] == [s.mappers, *([s.means] if mean else [])]
    if mean:
        assert s.means.grad[used].abs().sum() > 0
    fresh = VectorSet(num_classes=2, image_shape=SMALL, images_per_class=2, rank=2)  # not a dead point
    (fresh.decode() - 1).square().sum().backward()
    assert fresh.codes.grad.abs().sum() > 0


@pytest.mark.parametrize("subspaces, num_subspaces", [("per_class", 3), ("shared", 4)])
def test_random_pairing_draws_within_the_class(subspaces, num_subspaces):
    s = _random_set(subspaces=subspaces, num_subspaces=num_subspaces, pairing="random", images_per_class=5)
    idx = torch.arange(s.num_images)
    draws = torch.stack([s.subspaces_for(idx, generator=torch.Generator().manual_seed(t)) for t in range(20)])
    if subspaces == "per_class":
        cls = idx // 5
        assert bool(((draws >= cls * 3) & (draws < cls * 3 + 3)).all())
    assert len(torch.unique(draws)) == s.total_subspaces and not bool((draws == s.subspace_of).all())
    a = s.decode(idx, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, s.decode(idx, generator=torch.Generator().manual_seed(3)))
    k = s.subspaces_for(idx, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, torch.einsum("ndr,nr->nd", s.mappers[k], s.codes).view(-1, *SMALL))
    torch.testing.assert_close(s.decode(idx), s.decode(idx))  # no generator: fixed pairing
    # "repaired" evaluation epochs accept a vector set with random pairing, and refuse fixed pairing
    check_epoch_mode(EvalRecipe(epoch_mode="repaired"), synthetic=s)
    with pytest.raises(EpochModeError, match="pairing=random"):
        check_epoch_mode(EvalRecipe(epoch_mode="repaired"), synthetic=_random_set(num_subspaces=2))


def test_half_resolution_mappers_decode_to_the_full_size():
    s = _random_set(mapper_downsample=2, subspace_mean=True)
    assert s.mapper_shape == (3, 4, 5) and tuple(s.mappers.shape) == (3, 60, 2) and tuple(s.means.shape) == (3, 60)
    x = s.decode()
    assert tuple(x.shape) == (12, *SMALL)
    low = (torch.einsum("ndr,nr->nd", s.mappers[s.subspace_of], s.codes) + s.means[s.subspace_of]).view(-1, 3, 4, 5)
    torch.testing.assert_close(x, F.interpolate(low, size=(8, 10), mode="bilinear", align_corners=False))
    x.sum().backward()
    assert s.mappers.grad.abs().sum() > 0 and s.codes.grad.abs().sum() > 0
    # initialised from smooth images (a low-resolution pattern upsampled), the half-resolution set reconstructs them
    # well, and far better than white noise
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.randn(24, 3, 4, 5, generator=g), size=(8, 10), mode="bilinear", align_corners=False)
    y = torch.arange(3).repeat_interleave(8)
    kw = dict(num_classes=3, images_per_class=6, rank=6, mapper_downsample=2, generator=torch.Generator().manual_seed(1))
    _, info_smooth = VectorSet.from_real(smooth, y, **kw)
    _, info_noise = VectorSet.from_real(torch.randn(24, *SMALL, generator=g), y, **kw)
    assert info_smooth["relative_reconstruction_error"] < 0.35 < info_noise["relative_reconstruction_error"]


def test_validation_messages():
    base = dict(num_classes=2, image_shape=SMALL, images_per_class=2)
    with pytest.raises(ValueError, match="mapper_downsample=3 does not divide the image size 8x10"):
        VectorSet(**base, rank=2, mapper_downsample=3)
    with pytest.raises(ValueError, match="rank 241 exceeds D' = 240.*set rank=240"):
        VectorSet(**base, rank=241)
    with pytest.raises(ValueError, match="per_class, shared"):
        VectorSet(**base, rank=2, subspaces="global")
    with pytest.raises(ValueError, match="fixed, random"):
        VectorSet(**base, rank=2, pairing="roundrobin")
    with pytest.raises(ValueError, match="mapper_downsample must be a positive integer"):
        VectorSet(**base, rank=2, mapper_downsample=0)


# ---------------------------------------------------------------- initialisation: truncated SVD (method.md 5.5)


@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("subspaces, num_subspaces", [("per_class", 1), ("per_class", 2), ("shared", 2)])
def test_from_real_exact_when_rank_covers_the_subspace(mean, subspaces, num_subspaces):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, *SMALL, generator=g)
    y = torch.arange(3).repeat_interleave(10)
    per_subspace = 4 * 3 // (num_subspaces * 3 if subspaces == "per_class" else num_subspaces)  # 4 images per class
    kw = dict(num_classes=3, images_per_class=4, subspaces=subspaces, num_subspaces=num_subspaces, subspace_mean=mean,
              generator=torch.Generator().manual_seed(1))
    exact = per_subspace - (1 if mean else 0)  # centred on their mean, m images span m - 1 directions
    s, info = VectorSet.from_real(x, y, rank=max(exact, 1), **kw)
    assert info["relative_reconstruction_error"] < 1e-5 and info["repeated_images"] == 0
    # each decoded image is one real image of its own class
    dec = s.decode()
    for i in range(s.num_images):
        dist = (x - dec[i]).flatten(1).norm(dim=1)
        j = int(dist.argmin())
        assert dist[j] < 1e-4 and int(y[j]) == i // 4
    m = s.mappers
    torch.testing.assert_close(m.transpose(1, 2) @ m, torch.eye(m.shape[2]).expand(m.shape[0], -1, -1),
                               atol=1e-5, rtol=0)
    # a rank above the images of a subspace is completed with orthonormal directions, still exact
    s2, info2 = VectorSet.from_real(x, y, rank=per_subspace + 3, **kw)
    assert info2["relative_reconstruction_error"] < 1e-5
    m2 = s2.mappers
    torch.testing.assert_close(m2.transpose(1, 2) @ m2, torch.eye(per_subspace + 3).expand(m2.shape[0], -1, -1),
                               atol=1e-5, rtol=0)
    if exact > 1:  # one rank short: no longer exact
        _, short = VectorSet.from_real(x, y, rank=exact - 1, **kw)
        assert short["relative_reconstruction_error"] > 1e-2


@pytest.mark.parametrize("mean", [False, True])
def test_from_real_error_decreases_with_rank_and_matches_the_svd(mean):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(60, *SMALL, generator=g)
    y = torch.arange(3).repeat_interleave(20)
    errs = []
    kw = dict(num_classes=3, images_per_class=12, subspaces="shared", subspace_mean=mean)
    for r in (1, 2, 4, 8, 36):  # one shared subspace holds all 36 chosen images: exact at r = 36
        _, info = VectorSet.from_real(x, y, rank=r, generator=torch.Generator().manual_seed(0), **kw)
        errs.append(info["relative_reconstruction_error"])
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert 0 < errs[0] < 1.0 and errs[-1] < 1e-5
    # the error is the truncated SVD's: sqrt(sum of the discarded squared singular values) / ||X||, over the
    # images ``_choose_real_indices`` picks with the same generator
    idx, _ = _choose_real_indices(y, num_classes=3, images_per_class=12, generator=torch.Generator().manual_seed(0),
                                  candidates=None)
    flat = x[idx].flatten(1).double()
    sv = torch.linalg.svdvals(flat - flat.mean(0) if mean else flat)
    for r, err in zip((1, 2, 4, 8), errs):
        assert err == pytest.approx(float(sv[r:].square().sum().sqrt() / flat.norm()), rel=1e-4)


def test_from_real_takes_candidates_and_reports_repeats():
    x = torch.arange(12.0).reshape(12, 1, 1, 1).expand(12, *SMALL).clone()  # image i is filled with i
    y = torch.tensor([2, 0, 1, 0, 2, 1, 0, 1, 2, 0, 1, 2])
    cand = [torch.tensor([3, 9]), torch.tensor([5]), torch.tensor([0, 4, 8, 11])]
    s, info = VectorSet.from_real(x, y, num_classes=3, images_per_class=2, rank=2, candidates=cand,
                                  generator=torch.Generator().manual_seed(0))
    picked = s.decode().detach()[:, 0, 0, 0].round().long().tolist()  # rank 2 >= 2 images per subspace: exact
    assert sorted(picked[:2]) == [3, 9] and picked[2] == 5 and set(picked[4:]) <= {0, 4, 8, 11}
    _, info = VectorSet.from_real(x, y, num_classes=3, images_per_class=6, rank=2,
                                  generator=torch.Generator().manual_seed(0))
    assert info["repeated_images"] == 3 * 2  # 4 images per class, 6 wanted


# ---------------------------------------------------------------- serialisation


@pytest.mark.parametrize("kw", [dict(num_subspaces=2, pairing="random"),
                                dict(subspaces="shared", num_subspaces=3, subspace_mean=True, mapper_downsample=2)])
def test_describe_build_round_trip_and_state_dict(kw):
    s = _random_set(**kw)
    d = json.loads(json.dumps(s.describe()))
    assert d["type"] == "vector" and d["num_images"] == s.num_images and d["stored_floats"] == s.stored_floats()
    assert d["num_subspaces_total"] == s.total_subspaces == s.mappers.shape[0]
    assert d["mapper_shape"] == list(s.mapper_shape)
    rebuilt = build_synthetic_set(d)
    assert type(rebuilt) is VectorSet and not torch.equal(rebuilt.decode(), s.decode())
    rebuilt.load_state_dict(s.state_dict())
    torch.testing.assert_close(rebuilt.decode(), s.decode(), rtol=0, atol=0)
    assert rebuilt.describe() == s.describe()
    with pytest.raises(ValueError, match="do not match"):
        build_synthetic_set({**d, "shapes": {**d["shapes"], "codes": [1]}})
    with pytest.raises(RuntimeError, match="means"):  # a state without the means does not load into a set with them
        other = build_synthetic_set({**d, "subspace_mean": not d["subspace_mean"], "shapes": None})
        other.load_state_dict(s.state_dict())


# ---------------------------------------------------------------- memory=checkpoint gradients equal full mode's


# ---------------------------------------------------------------- the pipeline with param=vector


def tiny_vector(**kw):
    """Seconds-long form B distillation on the shared digits experts (1x8x8: D = 64; IPC 1 = 640 floats, one shared
    subspace of rank 4 = 256 mapper floats, (640 - 256) / (10 x 4) = 9 images per class)."""
    return tiny_distill_config(**{"param": "vector", "rank": 4, "iterations": 6, "eval_every": 3,
                                  "checkpoint_every": 2, **kw})


@pytest.fixture(scope="module")
def experts(experts_dir):
    return ExpertSet(experts_dir)


def test_distill_vector_writes_an_artifact_that_info_evaluate_export_and_show_read(experts, tmp_path, capsys):
    r = distill(tiny_vector(), experts=experts, out=tmp_path / "run", progress=False)
    assert isinstance(r.synthetic, VectorSet) and r.synthetic.images_per_class == 9
    assert all(torch.isfinite(torch.tensor(rec["loss"])) for rec in r.history) and len(r.history) == 6
    assert not all(rec["skipped"] for rec in r.history)
    art = mttlss.load(r.artifact)
    m = art.manifest
    assert m["synthetic"]["type"] == "vector" and m["synthetic"]["shapes"] == {"mappers": [1, 64, 4], "codes": [90, 4]}
    assert m["storage"]["images_per_class"] == 9
    assert m["storage"]["stored_floats_images"] == 256 + 360 <= m["storage"]["budget_floats"] == 640
    assert 0 < m["init"]["relative_reconstruction_error"] < 1
    assert art.images().shape == (90, 1, 8, 8)
    assert cli.main(["info", str(r.artifact)]) == 0
    out = capsys.readouterr().out
    assert "synthetic     type=vector" in out and "mapper_shape=[1, 8, 8]" in out and "9 images per class" in out
    assert cli.main(["evaluate", str(r.artifact), "--recipe", "quick-100", "--epochs", "3", "--runs", "1",
                     "--no-resume", "--json", str(tmp_path / "res.json")]) == 0
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["n_train"] == 90 and 0.0 <= res["mean"] <= 1.0
    files = export(art, fmt="ddranking", out_dir=tmp_path / "dd")
    assert torch.load(tmp_path / "dd" / "images.pt", weights_only=True).shape == (90, 1, 8, 8) and files
    assert cli.main(["show", str(r.artifact), "--out", str(tmp_path / "grid.png")]) == 0
    capsys.readouterr()
    assert all((tmp_path / f"grid{suffix}.png").stat().st_size > 0 for suffix in ("", "_mappers", "_codes"))


def test_vector_resume_with_ema_equals_uninterrupted(experts, tmp_path):
    # means and half-resolution mappers (D' = 1 x 4 x 4 = 16): (640 - 16 x 4 - 16) / (10 x 4) = 14 images per class
    knobs = dict(subspace_mean=True, mapper_downsample=2, pairing="random", ema_decay=0.5, eval_every=0,
                 select_on="none")
    a = distill(tiny_vector(**knobs), experts=experts, out=tmp_path / "a", progress=False)
    stopped = distill(tiny_vector(**knobs, stop_after=3), experts=experts, out=tmp_path / "b", progress=False)
    assert stopped.artifact is None
    b = distill(tiny_vector(**knobs), experts=experts, out=tmp_path / "b", progress=False)
    sa, sb = a.synthetic.state_dict(), b.synthetic.state_dict()
    assert set(sa) == {"mappers", "codes", "means"} and sa.keys() == sb.keys()
    assert tuple(sa["mappers"].shape) == (1, 16, 4) and a.synthetic.images_per_class == 14
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-6, rtol=0)
    assert a.selection.get("set") == "ema"
    art = mttlss.load(b.artifact)  # the artifact holds the means and decodes to full size
    assert art.manifest["synthetic"]["mapper_downsample"] == 2 and art.images().shape == (140, 1, 8, 8)
    torch.testing.assert_close(art.images(), b.synthetic.decode().detach(), atol=1e-6, rtol=0)
    start = distill(tiny_vector(**{**knobs, "ema_decay": None}, iterations=0), experts=experts, out=None,
                    progress=False)
    assert not torch.equal(start.synthetic.state_dict()["codes"], sa["codes"])  # distillation moved the codes
