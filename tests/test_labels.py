"""Labels: a class-faithful start whatever the experts say, soft or hard chosen on validation, label quality
reported in the info, the log and the artifact, compact storage (float16, top-k) used alike by validation and the
artifact, and old checkpoints and artifacts still usable."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import mttlss
import mttlss.distillation as distillation
from mttlss import cli
from mttlss.artifact import format_manifest, label_summary, read_manifest
from mttlss.config import resolve_config
from mttlss.distillation import distill
from mttlss.experts import ExpertSet
from mttlss.labels import (
    CONFIDENCES,
    TEMPERATURES,
    compact_labels,
    encode_labels,
    experts_mean_logits,
    init_soft_labels,
    label_candidates,
    label_stats,
    onehot_logits,
    raise_own_class,
    stored_label_floats,
)
from mttlss.models import ParamLayout, build_model

K = 5  # classes of the unit tests' linear "experts"


def tiny(**kw):
    """Seconds-long distillation on the shared digits experts (6 stored epochs); init=real, so the images do
    not depend on which experts are right."""
    base = dict(ipc=1, param="lowrank", rank=2, subspaces="shared", syn_steps=5, expert_epochs=2, iterations=0,
                max_start_epoch=4, current_max_start_epoch=2, expansion_end_epoch=10, eval_every=2, eval_epochs=20,
                eval_runs=1, grid_every=0, checkpoint_every=2, seed=0, init="real", dsa=False)
    base.update(kw)
    return resolve_config(**base)


def _linear_expert(shift: int) -> tuple[nn.Module, ParamLayout, torch.Tensor]:
    """A bias-free linear network on one-hot features that predicts class (c + shift) % K for class c."""
    model = nn.Linear(K, K, bias=False)
    weight = torch.roll(torch.eye(K), shifts=shift, dims=0) * 3.0  # row (c + shift) picks feature c
    return model, ParamLayout.of(model), weight.reshape(-1)


def test_labels_point_at_the_class_when_every_expert_is_wrong():
    y = torch.arange(K).repeat(4)
    x = torch.nn.functional.one_hot(y, K).float()
    model, layout, wrong1 = _linear_expert(1)
    _, _, wrong2 = _linear_expert(2)
    mean, hits = experts_mean_logits(model, layout, final_params=[wrong1, wrong2], x=x, y=y)
    assert hits.sum() == 0 and (mean.argmax(1) != y).all()  # DATM's fallback alone names another class everywhere
    logits = init_soft_labels(model, layout, final_params=[wrong1, wrong2], x=x, y=y)
    assert torch.equal(logits.argmax(1), y)
    own = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).max(1).values
    assert torch.allclose(own - others, torch.ones_like(own))  # raised by RAISE_MARGIN above the runner-up
    for _, cand in label_candidates(label_init="experts", base=logits, y=y, num_classes=K, value=None):
        assert torch.equal(cand.argmax(1), y)


def test_a_correct_expert_alone_sets_the_label_as_in_datm():
    y = torch.arange(K)
    x = torch.nn.functional.one_hot(y, K).float()
    model, layout, right = _linear_expert(0)
    _, _, wrong = _linear_expert(1)
    logits = init_soft_labels(model, layout, final_params=[wrong, right], x=x, y=y)
    assert torch.allclose(logits, x * 3.0)  # the mean over the experts that are right: the right one's logits


def test_raise_own_class_breaks_ties_and_leaves_correct_rows():
    logits = torch.tensor([[2.0, 2.0, 0.0], [0.0, 5.0, 1.0]])
    out = raise_own_class(logits, torch.tensor([1, 1]))
    assert torch.equal(out[1], logits[1])
    assert out[0].tolist() == [2.0, 3.0, 0.0]  # a tie is raised: argmax would otherwise pick class 0


def test_onehot_logits_reach_the_confidence_and_reject_too_low_ones():
    y = torch.tensor([0, 3, 4])
    for c in CONFIDENCES:
        p = torch.softmax(onehot_logits(y, num_classes=K, confidence=c), 1)
        assert torch.allclose(p.gather(1, y[:, None]).squeeze(1), torch.full((3,), c))
    with pytest.raises(ValueError, match=r"\(1/classes, 1\)"):
        onehot_logits(y, num_classes=K, confidence=1.0 / K)


def test_label_stats_of_soft_and_hard_labels():
    y = torch.tensor([0, 1])
    logits = torch.log(torch.tensor([[0.7, 0.3], [0.8, 0.2]]))
    stats = label_stats(logits, y)
    assert stats["agreement"] == 0.5
    assert stats["mean_max_prob"] == pytest.approx(0.75) and stats["mean_own_prob"] == pytest.approx(0.45)
    assert label_stats(y, y) == {"agreement": 1.0, "mean_max_prob": 1.0, "mean_own_prob": 1.0}


def test_label_knobs_are_validated():
    with pytest.raises(ValueError, match="drop soft_labels"):
        resolve_config(soft_labels=False, labels="soft")
    with pytest.raises(ValueError, match="label_temperature must be positive"):
        resolve_config(label_temperature=0.0)
    with pytest.raises(ValueError, match="label_init='uniform' is not one of"):
        resolve_config(label_init="uniform")
    assert resolve_config(soft_labels=False).label_mode == "hard" and resolve_config().label_mode == "auto"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("topk", [1, 3])
def test_topk_labels_keep_the_kept_probabilities_and_the_argmax(dtype, topk):
    n, classes = 50, 10
    logits = torch.randn(n, classes, generator=torch.Generator().manual_seed(0)) * 2
    stored = encode_labels(logits, dtype=dtype, topk=topk)
    assert sum(t.numel() * t.element_size() for t in stored.values()) == n * 4 * stored_label_floats(
        num_classes=classes, dtype=dtype, topk=topk)
    p = torch.softmax(logits, 1)
    q = torch.softmax(compact_labels(logits, dtype=dtype, topk=topk), 1)
    idx = stored["labels_topk_index"].long()
    assert torch.equal(idx, p.topk(topk, 1).indices)
    kept, true = q.gather(1, idx), p.gather(1, idx)
    torch.testing.assert_close(kept, stored["labels_topk_values"].float().exp(), rtol=0, atol=1e-6)  # the stored ones
    # rounded down, by at most one step of the stored log-probability (float32: none at all)
    step = 0.0 if dtype == "float32" else 2.0**-10
    assert ((kept <= true + 1e-6) & (true - kept <= true * -true.log() * step + 1e-6)).all()
    others = torch.ones(n, classes, dtype=torch.bool).scatter(1, idx, False)
    rest = (1 - kept.sum(1, keepdim=True)) / (classes - topk)  # the mass left, spread evenly
    torch.testing.assert_close(q[others].view(n, classes - topk), rest.expand(n, classes - topk), rtol=0, atol=1e-6)
    assert torch.equal(q.argmax(1), logits.argmax(1))


def test_compact_labels_of_every_class():
    logits = torch.randn(20, 10, generator=torch.Generator().manual_seed(1)) * 3
    same = compact_labels(logits)
    assert torch.equal(same, logits) and same.data_ptr() != logits.data_ptr()  # float32: unchanged, a copy
    half = compact_labels(logits, dtype="float16")
    assert half.dtype == torch.float32 and torch.equal(half, half.half().float())  # float16 values
    assert torch.equal(half.argmax(1), logits.argmax(1))
    torch.testing.assert_close(torch.softmax(half, 1), torch.softmax(logits, 1), rtol=0, atol=1e-2)


def test_label_storage_knobs_are_validated_and_hard_labels_ignore_them(experts_dir):
    with pytest.raises(ValueError, match=r"label_topk must be >= 1 .*got 0; null keeps every class"):
        resolve_config(label_topk=0)
    with pytest.raises(ValueError, match="label_dtype='bfloat16' is not one of 'float32', 'float16'"):
        resolve_config(label_dtype="bfloat16")
    bad_topk = r"label_topk=11 must lie in 1\.\.10 \(the 10 classes\); .*or null to store every class"
    with pytest.raises(ValueError, match=bad_topk) as exc:
        distill(tiny(label_topk=11), experts=experts_dir, out=None, progress=False)  # digits: 10 classes
    assert "\n" not in str(exc.value)
    r = distill(tiny(labels="hard", label_topk=11, label_dtype="float16"), experts=experts_dir, out=None, progress=False)
    assert r.labels.dtype == torch.long


def test_validation_and_the_artifact_use_the_labels_as_stored(experts_dir, tmp_path, monkeypatch):
    seen = []  # the targets each validation trained on

    def evaluate(**kw):
        seen.append(kw["targets"])
        return {"mean": 0.5}
    monkeypatch.setattr(distillation, "evaluate_synthetic", evaluate)
    out = tmp_path / "run"
    cfg = tiny(iterations=2, eval_every=1, labels="soft", label_temperature=1.0, label_dtype="float16", label_topk=2)
    r = distill(cfg, experts=experts_dir, out=out, progress=False)
    assert len(seen) == 3  # the start, iterations 1 and 2
    for targets in seen:  # the 8 classes outside each image's top 2 share what is left evenly
        low = targets.sort(1).values[:, :8]
        torch.testing.assert_close(low, low[:, :1].expand_as(low), rtol=0, atol=1e-7)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    learned = ckpt["state"]["labels"]  # the learnable logits keep every class at float32
    assert learned.dtype == torch.float32 and not torch.equal(compact_labels(learned, dtype="float16", topk=2), learned)
    y = r.synthetic.labels_hard()
    stats = label_stats(compact_labels(learned, dtype="float16", topk=2), y)
    assert r.history[-1]["label_own_prob"] == pytest.approx(stats["mean_own_prob"], rel=1e-6)
    assert r.selection["iteration"] == 0  # every validation scored 0.5: the start is kept
    assert torch.equal(r.labels, compact_labels(ckpt["best"]["labels"], dtype="float16", topk=2))
    with safe_open(str(r.artifact), framework="pt") as f:
        assert {k: f.get_tensor(k).dtype for k in f.keys() if k.startswith("labels")} == {
            "labels_topk_values": torch.float16, "labels_topk_index": torch.int16}
    art = mttlss.load(r.artifact)
    assert torch.equal(art.labels, r.labels)
    assert art.manifest["labels"]["mean_own_prob"] == pytest.approx(label_stats(r.labels, y)["mean_own_prob"], rel=1e-6)
    assert art.manifest["storage"]["label_floats"] == r.synthetic.num_images * 2 * (0.5 + 0.5)


class WrongExperts(ExpertSet):
    """The experts with the classifier of every final checkpoint rolled by one class: a final checkpoint predicts
    the next class wherever the real one was right."""

    def checkpoints(self, index: int, epochs: list[int]) -> torch.Tensor:
        rows = super().checkpoints(index, epochs).clone()
        data = self.dataset
        model = build_model(self.model, channels=data["image_shape"][0], num_classes=data["num_classes"],
                            image_size=tuple(data["image_shape"][1:]))
        layout = ParamLayout.of(model)
        for row, epoch in zip(rows, epochs):
            if epoch == self.epochs:
                for name in ("classifier.weight", "classifier.bias"):
                    view = layout.unflatten(row)[name]  # a view into row
                    view.copy_(view.roll(1, dims=0))
        return rows


def test_wrong_experts_still_give_class_faithful_labels_chosen_on_validation(experts_dir):
    cfg = tiny(labels="soft", param="pixel", ipc=3)  # real images: the unrolled experts label most of them right
    right = distill(cfg, experts=experts_dir, out=None, progress=False).init_info["labels"]
    r = distill(cfg, experts=WrongExperts(experts_dir), out=None, progress=False)
    rec = r.init_info["labels"]
    # the rolled experts really are wrong: DATM's mean alone would mislabel most images
    assert right["experts_agreement"] > 0.5 and rec["experts_agreement"] < 0.3 and rec["experts_correct"] < 0.3
    assert torch.equal(r.labels.argmax(1), r.synthetic.labels_hard())
    assert rec["start"]["agreement"] == 1.0 and rec["mode"] == "soft"
    soft = rec["soft"]
    assert [c["label_temperature"] for c in soft["candidates"]] == list(TEMPERATURES)
    assert all(c["agreement"] == 1.0 for c in soft["candidates"])
    scores = [c["val_acc"] for c in soft["candidates"]]
    assert soft["val_acc"] == max(scores) and soft["chosen"] == TEMPERATURES[scores.index(max(scores))]
    # sharper candidates are more confident; the chosen one is the start, and it competes in selection
    assert soft["candidates"][0]["mean_own_prob"] < soft["candidates"][-1]["mean_own_prob"]
    assert r.init_info["init_val_acc"] == soft["val_acc"] == r.selection["score"]
    assert "hard" not in rec["val_acc"]  # labels=soft: hard labels are not tried


def _fake_validate(*, hard: float):
    """validate() stand-in: hard labels score ``hard``; soft labels their mean largest probability."""
    def validate(cfg, state, **kw):
        if state.label_logits is None:
            return hard
        return float(torch.softmax(state.label_logits.detach(), 1).max(1).values.mean())
    return validate


def test_auto_starts_from_hard_labels_when_they_score_better_and_says_why(experts_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(distillation, "validate", _fake_validate(hard=0.999))
    r = distill(tiny(iterations=2), experts=experts_dir, out=tmp_path / "run", progress=False)
    rec = r.init_info["labels"]
    assert rec["requested"] == "auto" and rec["mode"] == "hard"
    assert rec["val_acc"]["hard"] == 0.999 > rec["val_acc"]["soft"]
    assert "hard labels 99.90 %" in rec["why"]
    assert r.init_info["init_val_acc"] == 0.999 and r.selection == {"select_on": "val", "iteration": 0,
                                                                    "score": 0.999, "metric": "validation accuracy"}
    assert r.labels.dtype == torch.long
    art = mttlss.load(r.artifact)
    assert art.label_kind == "hard" and art.manifest["storage"]["label_floats"] == 0
    assert art.manifest["init"]["labels"]["mode"] == "hard"
    assert cli.main(["info", str(r.artifact)]) == 0
    out = capsys.readouterr().out
    assert "label start   hard: labels=auto: soft labels scored" in out and "hard labels 99.90 %" in out


def test_auto_keeps_soft_labels_when_they_score_better(experts_dir, monkeypatch):
    monkeypatch.setattr(distillation, "validate", _fake_validate(hard=0.0))
    r = distill(tiny(), experts=experts_dir, out=None, progress=False)
    rec = r.init_info["labels"]
    assert rec["mode"] == "soft" and rec["soft"]["chosen"] == min(TEMPERATURES)  # the sharpest scores best here
    assert r.init_info["init_val_acc"] == rec["val_acc"]["soft"] == pytest.approx(rec["start"]["mean_max_prob"])
    assert torch.equal(r.labels.argmax(1), r.synthetic.labels_hard())


def test_fixed_choices_skip_the_validations(experts_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(distillation, "validate", lambda cfg, state, **kw: calls.append(state.label_logits) or 0.5)
    r = distill(tiny(labels="hard"), experts=experts_dir, out=None, progress=False)
    assert calls == [] and r.labels.dtype == torch.long and r.init_info["labels"]["why"] == "labels=hard was set"
    r = distill(tiny(labels="soft", label_init="onehot", label_confidence=0.7), experts=experts_dir, out=None,
                progress=False)
    assert calls == []  # one candidate, no hard competitor, iterations=0: nothing to validate
    assert r.init_info["labels"]["soft"]["why"] == "label_confidence=0.7 was set"
    assert r.init_info["labels"]["start"]["mean_own_prob"] == pytest.approx(0.7)


def test_label_quality_is_logged_at_validation_and_stored_in_the_artifact(experts_dir, tmp_path):
    r = distill(tiny(iterations=4, labels="soft", label_temperature=1.0), experts=experts_dir, out=tmp_path / "run",
                progress=False)
    assert [("label_agreement" in h) for h in r.history] == [False, True, False, True]
    last = r.history[-1]
    assert 0.0 <= last["label_agreement"] <= 1.0 and 0.0 < last["label_own_prob"] <= last["label_max_prob"] <= 1.0
    m = read_manifest(r.artifact)
    assert set(m["labels"]) >= {"agreement", "mean_max_prob", "mean_own_prob"}
    assert m["labels"]["mean_own_prob"] == pytest.approx(label_stats(r.labels, r.synthetic.labels_hard())["mean_own_prob"])
    summary = label_summary(m)
    assert summary.startswith("soft; labels=soft; temperature 1; agreement 100 -> ")


def test_a_checkpoint_from_before_the_label_knobs_still_resumes(experts_dir, tmp_path):
    out = tmp_path / "run"
    distill(tiny(iterations=4, stop_after=2), experts=experts_dir, out=out, progress=False)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    for key in ("labels", "label_init", "label_temperature", "label_confidence", "precision"):
        del ckpt["config"][key]  # what an older mttlss wrote (precision came with the memory modes)
    info = json.loads(ckpt["init_info"])
    del info["labels"]
    ckpt["init_info"] = json.dumps(info)
    torch.save(ckpt, out / "checkpoint.pt")
    r = distill(tiny(iterations=4), experts=experts_dir, out=out, progress=False)
    assert r.artifact is not None and [h["iteration"] for h in r.history] == [0, 1, 2, 3]
    assert "label start" not in format_manifest(read_manifest(r.artifact))  # nothing recorded, nothing invented
    with pytest.raises(distillation.DistillError, match="other settings"):  # a knob it has is still compared
        distill(tiny(iterations=6, soft_labels=False), experts=experts_dir, out=out, progress=False)


def test_an_artifact_from_before_label_scores_loads_and_prints(experts_dir, tmp_path):
    r = distill(tiny(labels="soft", label_temperature=1.0), experts=experts_dir, out=tmp_path / "run", progress=False)
    with safe_open(str(r.artifact), framework="pt") as f:
        manifest = json.loads(f.metadata()["mttlss"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    manifest["labels"] = {k: manifest["labels"][k] for k in ("kind", "temperature", "shape")}
    del manifest["init"]
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"mttlss": json.dumps(manifest)})
    art = mttlss.load(old)
    assert art.label_kind == "logits" and torch.equal(art.labels, r.labels)
    text = format_manifest(art.manifest)
    assert "labels        logits" in text and "agreement" not in text
    assert label_summary(art.manifest) == "soft"
