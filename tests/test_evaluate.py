import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mttlss.evaluate import RECIPES, evaluate_artifact, evaluate_full_data, format_results, get_recipe
from mttlss.models import build_model, model_spec
from mttlss.training import EvalRecipe, evaluate_accuracy, evaluate_synthetic, soft_cross_entropy, train_and_test

SPEC = model_spec("convnet", width=16, depth=2)


def blobs(n_per_class: int, *, seed: int, classes: int = 2):
    """Class c = a fixed random 1x8x8 pattern + noise: easy, but not linearly trivial at n=4/class."""
    g = torch.Generator().manual_seed(1234)  # class means shared by train and test
    means = torch.randn(classes, 1, 8, 8, generator=g)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = means[y] + 0.8 * torch.randn(len(y), 1, 8, 8, generator=g)
    return x, y


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # these networks are tiny: one thread avoids spin-wait overhead on a shared 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def problem():
    x, y = blobs(8, seed=0)
    xt, yt = blobs(100, seed=1)
    return x, y, xt, yt


def small(**kw):
    return get_recipe("quick-100", epochs=kw.pop("epochs", 20), batch_size=kw.pop("batch_size", 8),
                      dsa=kw.pop("dsa", False), **kw)


def test_soft_cross_entropy_one_hot_and_by_hand():
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3, 1, 1, 2])
    assert torch.allclose(soft_cross_entropy(z, F.one_hot(y, 4).float()), F.cross_entropy(z, y))
    z1 = torch.tensor([[1.0, 2.0, 0.0]])
    p = torch.tensor([[0.2, 0.5, 0.3]])
    lse = math.log(math.e + math.e**2 + 1)
    expected = -(0.2 * (1 - lse) + 0.5 * (2 - lse) + 0.3 * (0 - lse))
    assert soft_cross_entropy(z1, p).item() == pytest.approx(expected, rel=1e-6)


def test_get_recipe_names_and_errors():
    assert get_recipe("mtt-1000").batch_size == 256 and get_recipe("datm-1000").batch_size == 128
    assert get_recipe("fast-300").epochs == 300 and get_recipe("quick-100").epochs == 100
    assert get_recipe("mtt-1000", epochs=10).epochs == 10
    assert get_recipe("mtt-1000").decay_epoch == 500
    with pytest.raises(ValueError, match="mtt-1000"):
        get_recipe("nope")
    with pytest.raises(ValueError, match="unknown recipe field"):
        get_recipe("mtt-1000", epoch=3)
    with pytest.raises(ValueError, match="epoch_mode"):
        EvalRecipe(epoch_mode="steps")
    with pytest.raises(ValueError, match="lr"):
        EvalRecipe(lr=-1.0)
    assert {"mtt-1000", "datm-1000", "fast-300", "quick-100"} <= set(RECIPES)


def test_evaluate_accuracy_uses_eval_mode():
    torch.manual_seed(0)
    model = build_model(SPEC, channels=1, num_classes=2, image_size=(8, 8))
    x, y = blobs(4, seed=3)
    acc = evaluate_accuracy(model, x, y, batch_size=3)
    assert 0.0 <= acc <= 1.0 and not model.training


def test_train_and_test_learns_is_deterministic_and_decays(problem):
    x, y, xt, yt = problem
    recipe = small(dsa=True)
    a = train_and_test(x_train=x, targets=y, x_test=xt, y_test=yt, model_spec=SPEC, num_classes=2,
                       recipe=recipe, lr=0.01, seed=3)
    b = train_and_test(x_train=x, targets=y, x_test=xt, y_test=yt, model_spec=SPEC, num_classes=2,
                       recipe=recipe, lr=0.01, seed=3)
    assert a["test_acc"] >= 0.9  # chance is 0.5
    assert a["test_acc"] == b["test_acc"] and a["final_train_loss"] == b["final_train_loss"]
    assert a["seed"] == 3 and a["epochs"] == 20 and a["steps"] == 20 * 2  # 16 images, batch 8
    assert a["final_lr"] == pytest.approx(0.01 * 0.1)


def test_soft_targets_train(problem):
    x, y, xt, yt = problem
    probs = F.one_hot(y, 2).float() * 0.8 + 0.1
    r = train_and_test(x_train=x, targets=probs, x_test=xt, y_test=yt, model_spec=SPEC, num_classes=2,
                       recipe=small(), lr=0.01, seed=0)
    assert r["test_acc"] >= 0.9


def test_budget_epoch_mode_step_count(problem):
    x, y, xt, yt = problem  # 16 decoded images, but a storage budget of ipc=1 x 2 classes
    res = evaluate_synthetic(images=x, targets=y, x_test=xt, y_test=yt, model_spec=SPEC, num_classes=2,
                             lr=0.01, recipe=small(epochs=6, batch_size=4, epoch_mode="budget"), runs=1, ipc=3)
    # ceil(3 * 2 / 4) = 2 steps per epoch, instead of 16 / 4 = 4 for full passes
    assert res["recipe"]["steps_per_epoch"] == 2 and res["runs"][0]["steps"] == 12
    with pytest.raises(ValueError, match="ipc"):
        evaluate_synthetic(images=x, targets=y, x_test=xt, y_test=yt, model_spec=SPEC, num_classes=2,
                           lr=0.01, recipe=small(epoch_mode="budget"), runs=1)


def test_evaluate_synthetic_runs_and_stats(problem):
    x, y, xt, yt = problem
    res = evaluate_synthetic(images=x, targets=y, x_test=xt, y_test=yt, model_spec=SPEC, num_classes=2,
                             lr=0.01, recipe=small(epochs=5), runs=3, seed=10)
    assert [r["seed"] for r in res["runs"]] == [10, 11, 12]
    assert len(res["accs"]) == 3 and res["accs"] == [r["test_acc"] for r in res["runs"]]
    mean = sum(res["accs"]) / 3
    assert res["mean"] == pytest.approx(mean)
    assert res["std"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in res["accs"]) / 3))
    assert res["select_on"] == "none" and res["eval_split"] == "test" and res["n_train"] == 16
    assert res["recipe"]["lr"] == 0.01 and res["recipe"]["epochs"] == 5 and res["model"] == SPEC
    line = format_results(res)
    assert "over 3 runs" in line and "recipe quick-100" in line and "±" in line


def test_bad_lr_and_divergence_fail_loudly(problem):
    x, y, xt, yt = problem
    kw = dict(x_train=x, targets=y, x_test=xt, y_test=yt, model_spec=SPEC, num_classes=2, recipe=small(), seed=0)
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="learning rate"):
            train_and_test(lr=bad, **kw)
    with pytest.raises(RuntimeError, match="seed=0.*lower lr"):
        train_and_test(lr=1e30, **kw)


class FakeArtifact:
    """Duck-typed stand-in with the Artifact attributes evaluate_artifact reads."""

    def __init__(self, x, y):
        # training space = negated pixels; a shift or scale would be undone by the ConvNet's instance norm
        self._x, self.labels, self.label_kind, self.lr = -x, y, "hard", 0.01
        self.preprocessor = lambda pix: -pix
        self.manifest = {"dataset": {"name": "blobs", "num_classes": 2, "image_shape": [1, 8, 8]},
                         "model": SPEC, "ipc": 8}

    def images(self):
        return self._x


def test_evaluate_artifact_applies_preprocessor_and_checks_shapes(problem):
    x, y, xt, yt = problem
    data = SimpleNamespace(name="blobs", num_classes=2, x_test=xt, y_test=yt, x_val=xt[:20], y_val=yt[:20])
    art = FakeArtifact(x, y)  # without the preprocessor the test images would be negated
    res = evaluate_artifact(art, data=data, recipe=small(), runs=1, device="cpu")
    assert res["mean"] >= 0.9 and res["recipe"]["lr_source"] == "artifact" and res["recipe"]["lr"] == 0.01
    val = evaluate_artifact(art, data=data, recipe=small(), epochs=2, runs=1, device="cpu", split="val")
    assert val["eval_split"] == "val" and val["recipe"]["epochs"] == 2
    wrong = SimpleNamespace(name="blobs", num_classes=3, x_test=xt, y_test=yt, x_val=xt, y_val=yt)
    with pytest.raises(ValueError, match="classes"):
        evaluate_artifact(art, data=wrong, recipe=small(), runs=1, device="cpu")
    wrong = SimpleNamespace(name="blobs", num_classes=2, x_test=xt[:, :, :4], y_test=yt, x_val=xt, y_val=yt)
    with pytest.raises(ValueError, match="shape"):
        evaluate_artifact(art, data=wrong, recipe=small(), runs=1, device="cpu")


def test_evaluate_full_data_uses_preprocessor_and_fixed_lr(problem):
    x, y, xt, yt = problem
    data = SimpleNamespace(name="blobs", num_classes=2, x_train=x, y_train=y, x_test=xt, y_test=yt)
    seen = []
    res = evaluate_full_data(data, preprocessor=lambda pix: seen.append(len(pix)) or pix, model_spec=SPEC,
                             recipe=get_recipe("full-30", epochs=10, batch_size=8, dsa=False))
    assert res["full_data"] and res["recipe"]["lr"] == 0.01 and res["n_train"] == 16 and len(res["accs"]) == 1
    assert res["mean"] >= 0.9 and seen == [16, 200]  # train and test both preprocessed


def test_evaluate_artifact_end_to_end_on_digits(tmp_path):
    from mttlss.artifact import read_manifest
    from mttlss.baselines import random_real_artifact

    path = random_real_artifact(dataset="digits", ipc=5, out=tmp_path / "random.safetensors")
    res = evaluate_artifact(path, model=model_spec("convnet", width=16, depth=2), recipe="quick-100", epochs=30,
                            runs=1, device="cpu", record=True)
    assert res["dataset"] == "digits" and res["n_train"] == 50 and res["label_kind"] == "hard"
    assert res["mean"] > 0.5  # chance is 0.1
    recorded = read_manifest(path)["results"]
    assert len(recorded) == 1 and recorded[0]["accs"] == res["accs"]


# ---------------------------------------------------------------- epoch_mode="repaired" (method.md 11.2 (c))


def repairable_set(x, y, *, pairing="random", subspaces="per_class", num_subspaces=2, images_per_class=4):
    """A 2-class low-rank set from the blobs: 4 codes per class, 2 PCA subspaces per class (all distinct)."""
    from mttlss.parameterization import LowRankSet

    s, _ = LowRankSet.from_real(x, y, num_classes=2, images_per_class=images_per_class, rank=2, subspaces=subspaces,
                                num_subspaces=num_subspaces, pairing=pairing, generator=torch.Generator().manual_seed(0))
    return s


def subspace_of_rows(s, images):
    """The subspace each row of ``images`` [n, C, H, W] was decoded with, checking that row i is code i."""
    rows = []
    for i in range(images.shape[0]):
        k = torch.arange(s.total_subspaces)
        with torch.no_grad():
            cands = s._compose(s.mappers_U[k], s.codes[i].expand(len(k), *s.codes.shape[1:]), s.mappers_V[k])
        dist = (cands - images[i]).flatten(1).norm(dim=1)
        assert float(dist.min()) < 1e-4 * max(float(images[i].norm()), 1.0)  # row i is code i with one mapper
        rows.append(int(dist.argmin()))
    return torch.tensor(rows)


def own_class_subspaces(s):
    """[n, num_subspaces]: the subspaces code i may meet under per-class subspaces."""
    cls = s.labels_hard()
    return cls[:, None] * s.num_subspaces + torch.arange(s.num_subspaces)


def test_repaired_images_redraw_each_epoch_within_the_class(problem):
    from mttlss.training import pairing_generator, repaired_images

    x, y, _, _ = problem
    s = repairable_set(x, y)
    allowed = own_class_subspaces(s)

    def draws(seed, epochs=6):
        g = pairing_generator(seed)
        return [subspace_of_rows(s, repaired_images(s, generator=g)) for _ in range(epochs)]

    a, b, other = draws(3), draws(3), draws(4)
    assert all(torch.equal(p, q) for p, q in zip(a, b))  # same network seed: the same pairings
    assert any(not torch.equal(a[0], p) for p in a[1:])  # epochs see different pairings
    assert any(not torch.equal(p, q) for p, q in zip(a, other))  # another seed, other pairings
    for p in a + other:  # every re-pairing keeps each code with a mapper of its own class
        assert bool((p[:, None] == allowed).any(dim=1).all())
    assert len(torch.cat(a).unique()) == s.total_subspaces  # and every mapper gets used


def test_repaired_epochs_train_on_all_codes_re_paired(problem, monkeypatch):
    import mttlss.training as training

    x, y, xt, yt = problem
    s = repairable_set(x, y)
    seen = []
    original = training.train_one_epoch

    def spy(model, optimizer, *, x, **kw):
        seen.append(x.detach().clone())
        return original(model, optimizer, x=x, **kw)

    monkeypatch.setattr(training, "train_one_epoch", spy)
    recipe = small(epochs=4, batch_size=3, epoch_mode="repaired")
    soft = F.one_hot(s.labels_hard(), 2).float() * 0.8 + 0.1
    fixed = s.decode().detach()
    res = evaluate_synthetic(images=fixed, targets=soft, x_test=xt, y_test=yt, model_spec=SPEC, num_classes=2,
                             lr=0.01, recipe=recipe, runs=1, seed=5, synthetic=s)
    assert len(seen) == 4 and all(e.shape == (s.num_images, 1, 8, 8) for e in seen)  # n codes per epoch
    assert res["runs"][0]["steps"] == 4 * math.ceil(s.num_images / 3) and res["n_train"] == s.num_images
    pairings = [subspace_of_rows(s, e) for e in seen]
    assert any(not torch.equal(pairings[0], p) for p in pairings[1:])
    g = training.pairing_generator(5)  # the network's pairings come from its seed's stream
    assert all(torch.equal(e, training.repaired_images(s, generator=g)) for e in seen)
    assert res["recipe"]["epoch_mode"] == "repaired" and res["recipe"]["labels"] == "soft"
    assert res["repairing"]["images_per_epoch"] == s.num_images and res["repairing"]["own_class_only"]
    assert "(repaired)" in format_results(res)


def test_repaired_mode_refuses_fixed_pairing_and_pixel_sets(problem):
    from mttlss.config import DistillConfig
    from mttlss.parameterization import PixelSet
    from mttlss.training import EpochModeError

    x, y, xt, yt = problem
    pixel = PixelSet.from_real(x, y, num_classes=2, images_per_class=4)
    for s in (repairable_set(x, y, pairing="fixed"), pixel, None):
        with pytest.raises(EpochModeError, match=r"needs a low-rank set with pairing=random.*--epoch-mode decoded"):
            evaluate_synthetic(images=x[:8], targets=y[:8], x_test=xt, y_test=yt, model_spec=SPEC, num_classes=2,
                               lr=0.01, recipe=small(epoch_mode="repaired"), runs=1, synthetic=s)
    with pytest.raises(EpochModeError, match="pairing=random"):
        train_and_test(x_train=x, targets=y, x_test=xt, y_test=yt, model_spec=SPEC, num_classes=2,
                       recipe=small(epoch_mode="repaired"), lr=0.01, seed=0)
    with pytest.raises(ValueError, match="set pairing=random"):
        DistillConfig(eval_epoch_mode="repaired", pairing="fixed").validate()
    DistillConfig(eval_epoch_mode="repaired", pairing="random").validate()


def test_repaired_mode_end_to_end_through_the_cli(tmp_path, capsys):
    from mttlss import cli
    from mttlss.artifact import read_manifest, save_artifact
    from mttlss.baselines import random_real_artifact
    from mttlss.data import dataset_record, load_dataset
    from mttlss.parameterization import LowRankSet
    from mttlss.preprocessing import Preprocessor

    data = load_dataset("digits")
    pre = Preprocessor.fit("normalize", data.x_train, dataset="digits")
    s, _ = LowRankSet.from_real(pre(data.x_train), data.y_train, num_classes=10, images_per_class=4, rank=2,
                                num_subspaces=2, pairing="random", generator=torch.Generator().manual_seed(0))
    path = save_artifact(tmp_path / "lss.safetensors", synthetic=s, labels=s.labels_hard(), lr=0.01, preprocessor=pre,
                         dataset=dataset_record(data, data_root=None), ipc=3, model=SPEC,
                         selection={"select_on": "none", "iteration": None, "score": None}, config={"method": "test"})
    argv = ["evaluate", str(path), "--recipe", "quick-100", "--epochs", "3", "--runs", "1", "--no-resume"]
    assert cli.main([*argv, "--epoch-mode", "repaired", "--record"]) == 0
    out = capsys.readouterr().out
    assert "(repaired)" in out and "n_train 40" in out
    recorded = read_manifest(path)["results"][-1]
    assert recorded["recipe"]["epoch_mode"] == "repaired" and recorded["recipe"]["name"] == "quick-100@3ep@repaired"
    assert recorded["repairing"]["images_per_epoch"] == 40
    pixel = random_real_artifact(dataset="digits", ipc=1, out=tmp_path / "pixel.safetensors")
    assert cli.main(["evaluate", str(pixel), "--epochs", "3", "--runs", "1", "--epoch-mode", "repaired"]) == 2
    assert "pairing=random" in capsys.readouterr().err


# ---------------------------------------------------------------- other networks than the set's own


def test_a_trailing_batch_of_one_joins_the_one_before_for_batchnorm_only():
    from mttlss.training import decoded_batch_count, epoch_batches

    plain = epoch_batches(10, batch_size=3, steps=None, generator=torch.Generator().manual_seed(0))
    merged = epoch_batches(10, batch_size=3, steps=None, generator=torch.Generator().manual_seed(0), min_batch=2)
    assert [len(b) for b in plain] == [3, 3, 3, 1] and [len(b) for b in merged] == [3, 3, 4]
    assert torch.equal(torch.cat(plain), torch.cat(merged))  # the same permutation, every image once
    assert [decoded_batch_count(n, batch_size=3, min_batch=2) for n in (1, 3, 4, 5, 10)] == [1, 1, 1, 2, 3]
    assert [decoded_batch_count(n, batch_size=3) for n in (1, 3, 4, 5, 10)] == [1, 1, 2, 2, 4]


def test_evaluate_artifact_trains_other_networks_with_their_own_options(tmp_path):
    """ResNet-18 (BatchNorm) on 8x8 digits: its last stage sees 1x1 maps, where a batch of one image has no batch
    statistics; 10 images in batches of 3 would end with one. The set's ConvNet width is not passed on."""
    from mttlss.baselines import random_real_artifact

    path = random_real_artifact(dataset="digits", ipc=1, out=tmp_path / "random.safetensors")
    recipe = small(epochs=2, batch_size=3)
    res = evaluate_artifact(path, model="resnet18_bn", recipe=recipe, runs=1, device="cpu")
    assert res["model"] == {"name": "resnet18_bn", "norm": "batchnorm"} and 0.0 <= res["mean"] <= 1.0
    assert res["runs"][0]["steps"] == 2 * 3  # batches of 3, 3 and 4 each epoch
    own = evaluate_artifact(path, recipe=recipe, runs=1, device="cpu")  # the set's own ConvNet: batches 3, 3, 3, 1
    assert own["model"]["name"] == "convnet" and own["runs"][0]["steps"] == 2 * 4
    alex = evaluate_artifact(path, model="alexnet", recipe=recipe, runs=1, device="cpu")
    assert alex["model"] == {"name": "alexnet"} and 0.0 <= alex["mean"] <= 1.0
    with pytest.raises(ValueError, match=r"too small.*convnet, alexnet or resnet18_bn"):  # 5 pools on 8x8 images
        evaluate_artifact(path, model="vgg11", recipe=recipe, runs=1, device="cpu")
