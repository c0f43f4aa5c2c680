import json
import math

import pytest
import torch
import torch.nn.functional as F

import mttlss
from conftest import tiny_distill_config
from mttlss.config import resolve_config
from mttlss.distillation import DistillError, distill, expert_for_iteration, lr_factor
from mttlss.experts import ExpertSet
from mttlss.matching import batch_schedule, trajectory_loss, unroll_student
from mttlss.models import ParamLayout, build_model
from mttlss.training import soft_label_loss


def tiny(**kw):
    """Seconds-long distillation on the shared digits experts (6 stored epochs)."""
    return tiny_distill_config(**kw)


@pytest.fixture(scope="module")
def experts(experts_dir):
    return ExpertSet(experts_dir)


def _segment_loss(experts, syn, label_logits, syn_lr, *, start_epoch=1, expert_epochs=2, steps=5, seed=123):
    """The matching loss of one FIXED segment (expert 0, fixed batches, no DSA): comparable across sets."""
    data = experts.dataset
    model = build_model(experts.model, channels=data["image_shape"][0], num_classes=data["num_classes"],
                        image_size=tuple(data["image_shape"][1:]))
    layout = ParamLayout.of(model)
    start, target = experts.checkpoints(0, [start_epoch, start_epoch + expert_epochs])
    gen = torch.Generator().manual_seed(seed)
    batches = batch_schedule(syn.num_images, syn.num_images, steps, gen)
    hard = syn.labels_hard()

    def label_loss(logits, idx):
        if label_logits is not None:
            return soft_label_loss(logits, label_logits[idx])
        return F.cross_entropy(logits, hard[idx])

    with torch.enable_grad():
        student = unroll_student(model, layout, start, decode=lambda idx: syn.decode(idx), label_loss=label_loss,
                                 syn_lr=torch.tensor(syn_lr), batches=batches, dsa_config=None, generator=None)
        return float(trajectory_loss(student, start, target).detach())


def test_lowrank_matching_loss_goes_down(experts, tmp_path):
    # iteration 0 only initialises: its result is the starting set; compare with the set after 30 iterations
    cfg0 = tiny(iterations=1, lr_img=1e-12, lr_y=0.0, lr_lr=0.0, select_on="none", dsa=False)
    r0 = distill(cfg0, experts=experts, out=None, progress=False)
    cfg = tiny(iterations=30, select_on="none", dsa=False)
    r = distill(cfg, experts=experts, out=None, progress=False)
    before = _segment_loss(experts, r0.synthetic, r0.labels, r0.syn_lr)
    after = _segment_loss(experts, r.synthetic, r.labels, r.syn_lr)
    assert after < before - 0.01, (before, after)
    assert not any(rec["skipped"] for rec in r.history)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_equals_uninterrupted(experts, tmp_path, schedule):
    cfg = tiny(iterations=12, lr_schedule=schedule)
    a = distill(cfg, experts=experts, out=tmp_path / "a", progress=False)
    stopped = distill(tiny(iterations=12, stop_after=5, lr_schedule=schedule), experts=experts, out=tmp_path / "b",
                      progress=False)
    assert stopped.artifact is None and len(stopped.history) == 5
    assert not (tmp_path / "b" / "synthetic.safetensors").exists()
    b = distill(cfg, experts=experts, out=tmp_path / "b", progress=False)
    sa, sb = a.synthetic.state_dict(), b.synthetic.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(b.labels, a.labels, atol=1e-6, rtol=0)
    assert b.syn_lr == pytest.approx(a.syn_lr, abs=1e-9)
    assert b.selection == a.selection
    log_a = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log_b] == list(range(12))
    assert [r["loss"] for r in log_b] == pytest.approx([r["loss"] for r in log_a], abs=1e-6)
    assert [r["expert"] for r in log_b] == [r["expert"] for r in log_a]


def test_lr_factor_cosine_decays_to_zero():
    assert lr_factor("constant", 7, 10) == 1.0
    cosine = [lr_factor("cosine", i, 10) for i in range(11)]
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5) and cosine[10] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(cosine, cosine[1:]))


def test_cosine_schedule_is_applied_and_logged(experts):
    r = distill(tiny(iterations=8, lr_schedule="cosine", select_on="none"), experts=experts, out=None, progress=False)
    factors = [rec["lr_factor"] for rec in r.history if not rec["skipped"]]
    assert factors == pytest.approx([lr_factor("cosine", rec["iteration"], 8) for rec in r.history if not rec["skipped"]])
    assert factors[0] == 1.0 and factors[-1] < 0.1


def test_resume_with_other_settings_is_refused(experts, tmp_path):
    distill(tiny(iterations=4, stop_after=2), experts=experts, out=tmp_path / "r", progress=False)
    with pytest.raises(DistillError, match="other settings"):
        distill(tiny(iterations=4, lr_img=5.0), experts=experts, out=tmp_path / "r", progress=False)


def test_non_finite_loss_names_the_knobs(experts, monkeypatch):
    import mttlss.distillation as distill_mod

    monkeypatch.setattr(distill_mod, "trajectory_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(DistillError, match="lr_img"):
        distill(tiny(iterations=3), experts=experts, out=None, progress=False)


def test_exploding_step_size_is_caught(experts):
    with pytest.raises(DistillError, match="lr_img|lr_lr|syn_steps"):
        distill(tiny(iterations=3, lr_teacher=1e30), experts=experts, out=None, progress=False)


def test_skips_stop_after_max_consecutive(experts):
    with pytest.raises(DistillError, match="3 consecutive iterations") as info:
        distill(tiny(iterations=10, threshold=0.0, threshold_probe=0, max_consecutive_skips=3), experts=experts, out=None, progress=False)
    assert "threshold" in str(info.value) and "lr_img" in str(info.value)


def test_segment_beyond_stored_epochs(experts):
    with pytest.raises(DistillError, match="--epochs 8"):
        distill(tiny(max_start_epoch=7, current_max_start_epoch=2), experts=experts, out=None, progress=False)


def test_artifact_loads_and_is_selected_on_val(experts, tmp_path):
    r = distill(tiny(iterations=6, eval_every=3), experts=experts, out=tmp_path / "run", progress=False)
    assert r.artifact == tmp_path / "run" / "synthetic.safetensors"
    art = mttlss.load(r.artifact)
    sel = art.manifest["selection"]
    assert sel["select_on"] == "val" and sel["iteration"] in (0, 3, 6) and 0.0 <= sel["score"] <= 1.0
    assert art.images().shape[1:] == (1, 8, 8)
    assert art.manifest["storage"]["stored_floats_images"] <= art.manifest["storage"]["budget_floats"] == 640
    # labels=auto (the default) started from whichever scored better on validation; the artifact says which
    assert art.label_kind == {"soft": "logits", "hard": "hard"}[art.manifest["init"]["labels"]["mode"]]
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    vals = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [("val_acc" in v) for v in vals] == [False, False, True, False, False, True]


def test_pixel_with_hard_labels_runs(experts):
    r = distill(tiny(param="pixel", iterations=4, soft_labels=False, select_on="none"), experts=experts, out=None,
                progress=False)
    assert r.synthetic.num_images == 10 and r.labels.dtype == torch.long
    assert r.selection["select_on"] == "none"
    assert all(torch.isfinite(torch.tensor(rec["loss"])) for rec in r.history)


def test_random_pairing_runs(experts):
    r = distill(tiny(pairing="random", iterations=4, select_on="none"), experts=experts, out=None, progress=False)
    assert len(r.history) == 4 and r.synthetic.describe()["pairing"] == "random"


def test_expert_cycle_visits_every_expert():
    order = [expert_for_iteration([0, 1, 2], 0, i) for i in range(6)]
    assert sorted(order[:3]) == [0, 1, 2] and sorted(order[3:]) == [0, 1, 2]


def test_checkpoint_memory_mode_distills_the_same_set_as_full_mode(experts, tmp_path):
    runs = {}
    for memory in ("full", "checkpoint"):
        runs[memory] = distill(tiny(iterations=6, select_on="none", memory=memory, pairing="random", num_subspaces=2),
                               experts=experts, out=tmp_path / memory, progress=False)
    full, ckpt = runs["full"], runs["checkpoint"]
    assert [r["loss"] for r in full.history] == pytest.approx([r["loss"] for r in ckpt.history], rel=1e-4)
    for key, value in full.synthetic.state_dict().items():
        assert torch.allclose(value, ckpt.synthetic.state_dict()[key], rtol=1e-3, atol=1e-5), key
    assert torch.allclose(full.labels, ckpt.labels, rtol=1e-3, atol=1e-5)
    assert full.syn_lr == pytest.approx(ckpt.syn_lr, rel=1e-4)
    assert {k: full.init_info["memory"][k] for k in ("mode", "why")} == {"mode": "full", "why": "memory=full was set"}
    assert ckpt.init_info["memory"]["mode"] == "checkpoint"
    # the artifact says how it was made
    assert mttlss.load(ckpt.artifact).manifest["init"]["memory"]["mode"] == "checkpoint"
    from mttlss.runtime import allocator_status  # and which allocator this process ran with

    recorded = mttlss.load(ckpt.artifact).manifest["init"]["allocator"]
    assert recorded == allocator_status() and recorded["allocator"] in ("glibc-tuned", "system") and recorded["why"]
    from mttlss.artifact import format_manifest, read_manifest

    assert "unroll memory checkpoint: memory=checkpoint was set" in format_manifest(read_manifest(ckpt.artifact))


def test_auto_memory_mode_measures_the_graph_and_says_what_it_chose(experts, monkeypatch):
    import mttlss.distillation as distillation

    r = distill(tiny(iterations=1, select_on="none"), experts=experts, out=None, progress=False)
    assert r.init_info["memory"]["mode"] == "full"  # a tiny graph fits
    assert "memory=auto chose full" in r.init_info["memory"]["why"]
    monkeypatch.setattr(distillation, "available_memory_bytes", lambda device: 1000)  # 1 kB free
    r = distill(tiny(iterations=1, select_on="none", force=True), experts=experts, out=None, progress=False)
    assert r.init_info["memory"]["mode"] == "checkpoint"
    assert "GiB of graph" in r.init_info["memory"]["why"] and "force=true: started although" in r.init_info["memory"]["why"]


def test_a_run_that_cannot_fit_is_refused_before_iteration_0_naming_the_knobs(experts, monkeypatch, tmp_path):
    import mttlss.distillation as distillation

    r = distill(tiny(iterations=0, select_on="none", memory="full"), experts=experts, out=None, progress=False)
    est = r.init_info["memory"]["estimate"]
    # full mode keeps every step's graph, checkpoint mode about two of them plus theta_n per step
    assert est["full"] == pytest.approx(1.2 * 5 * est["graph_per_step"])
    assert est["checkpoint"] < est["full"] and est["data"] > 0
    monkeypatch.setattr(distillation, "available_memory_bytes", lambda device: int(est["checkpoint"] * 1.1))
    r = distill(tiny(iterations=1, select_on="none"), experts=experts, out=None, progress=False)
    assert r.init_info["memory"]["mode"] == "checkpoint"  # auto falls back to the mode that fits
    with pytest.raises(DistillError) as info:
        distill(tiny(iterations=1, memory="full"), experts=experts, out=tmp_path / "run", progress=False)
    for knob in ("memory=full", "syn_steps=5", "batch_syn=10", "device cpu", "force=true"):
        assert knob in str(info.value), knob
    assert not (tmp_path / "run" / "log.jsonl").exists()  # refused before the first iteration


def test_unset_batch_syn_costs_what_the_pixel_set_of_the_budget_would(experts):
    r = distill(tiny(iterations=1, select_on="none"), experts=experts, out=None, progress=False)
    assert r.synthetic.num_images > 10  # the decoded low-rank set is larger than the budget's pixel set...
    assert r.init_info["batch_syn"]["value"] == 10  # ...but each inner step takes IPC x classes = 1 x 10 images
    assert "IPC 1 x 10 classes" in r.init_info["batch_syn"]["why"]
    r = distill(tiny(iterations=1, select_on="none", batch_syn=4), experts=experts, out=None, progress=False)
    assert "batch_syn" not in r.init_info


def test_memory_mode_can_change_on_resume_but_precision_cannot(experts, tmp_path):
    out = tmp_path / "run"
    distill(tiny(iterations=8, stop_after=4, memory="full"), experts=experts, out=out, progress=False)
    r = distill(tiny(iterations=8, memory="checkpoint"), experts=experts, out=out, progress=False)
    assert r.artifact is not None and len(r.history) == 8
    with pytest.raises(DistillError, match="precision"):
        distill(tiny(iterations=10, precision="bf16"), experts=experts, out=out, progress=False)


def _precision(monkeypatch, experts, flag, *, min_gflop=None, **kw):
    monkeypatch.setattr("mttlss.distillation.native_bf16_flag", lambda: flag)
    if min_gflop is not None:
        monkeypatch.setattr("mttlss.distillation.AUTO_BF16_MIN_GFLOP", min_gflop)
    r = distill(tiny(iterations=0, select_on="none", **kw), experts=experts, out=None, progress=False)
    return r.init_info["precision"]


def test_precision_auto_is_bf16_only_on_a_cpu_with_native_bf16_and_a_large_enough_step(monkeypatch, experts):
    small = _precision(monkeypatch, experts, "avx512_bf16")  # digits, width 16: a few MFLOP a step
    assert small["mode"] == "fp32" and "under the 0.5" in small["why"] and "precision=bf16" in small["why"]
    assert 0 < small["step_forward_gflop"] < 0.01 and small["native_bf16"] == "avx512_bf16"
    large = _precision(monkeypatch, experts, "avx512_bf16", min_gflop=0.0)
    assert large["mode"] == "bf16" and "avx512_bf16" in large["why"] and "precision=fp32" in large["why"]
    none = _precision(monkeypatch, experts, None, min_gflop=0.0)
    assert none["mode"] == "fp32" and "no native bf16" in none["why"]
    assert _precision(monkeypatch, experts, None, precision="bf16")["mode"] == "bf16"  # asked for: given
    assert _precision(monkeypatch, experts, "amx_bf16", min_gflop=0.0, precision="fp32") == {
        "mode": "fp32", "why": "precision=fp32 was set"}


def _spy_precisions(monkeypatch) -> list[str]:
    """The precision of every unroll that distill runs from now on."""
    import mttlss.distillation as distillation

    seen, real = [], distillation.unroll_student

    def spy(*args, precision, **kwargs):
        seen.append(precision)
        return real(*args, precision=precision, **kwargs)

    monkeypatch.setattr(distillation, "unroll_student", spy)
    return seen


def test_precision_auto_resumes_in_the_precision_the_run_started_in(experts, tmp_path, monkeypatch, capsys):
    from mttlss.artifact import format_manifest, read_manifest

    out = tmp_path / "run"
    monkeypatch.setattr("mttlss.distillation.native_bf16_flag", lambda: "amx_bf16")
    monkeypatch.setattr("mttlss.distillation.AUTO_BF16_MIN_GFLOP", 0.0)
    r = distill(tiny(iterations=4, stop_after=2, select_on="none"), experts=experts, out=out, progress=False)
    assert r.init_info["precision"]["mode"] == "bf16" and "amx_bf16" in r.init_info["precision"]["why"]
    monkeypatch.setattr("mttlss.distillation.native_bf16_flag", lambda: None)  # resumed on a machine without it
    with pytest.raises(DistillError, match="precision=bf16"):
        distill(tiny(iterations=4, select_on="none", precision="fp32"), experts=experts, out=out, progress=False)
    seen = _spy_precisions(monkeypatch)
    r = distill(tiny(iterations=4, select_on="none"), experts=experts, out=out, progress=True)
    assert seen == ["bf16", "bf16"]  # the two iterations left ran in the start's precision
    assert "precision=auto: bf16, as this run started (this CPU has no native bf16" in capsys.readouterr().err
    assert r.init_info["precision"]["mode"] == "bf16" and len(r.history) == 4
    assert "unroll precision bf16: precision=auto chose bf16" in format_manifest(read_manifest(r.artifact))


@pytest.mark.parametrize("configured, resumed", [("bf16", "bf16"), ("fp32", "fp32"), (None, "fp32")])
def test_a_checkpoint_from_before_precision_auto_resumes_in_what_it_configured(experts, tmp_path, monkeypatch,
                                                                               configured, resumed):
    out = tmp_path / "run"
    distill(tiny(iterations=4, stop_after=2, select_on="none", precision=configured or "fp32"), experts=experts,
            out=out, progress=False)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    if configured is None:  # older still: no precision knob at all
        del ckpt["config"]["precision"]
    info = json.loads(ckpt["init_info"])
    del info["precision"]  # what mttlss wrote before precision=auto
    ckpt["init_info"] = json.dumps(info)
    torch.save(ckpt, out / "checkpoint.pt")
    monkeypatch.setattr("mttlss.distillation.native_bf16_flag", lambda: "avx512_bf16")  # auto would pick bf16 now
    monkeypatch.setattr("mttlss.distillation.AUTO_BF16_MIN_GFLOP", 0.0)
    seen = _spy_precisions(monkeypatch)
    r = distill(tiny(iterations=4, select_on="none"), experts=experts, out=out, progress=False)
    assert seen == [resumed, resumed] and r.init_info["precision"]["mode"] == resumed
    other = "fp32" if resumed == "bf16" else "bf16"
    with pytest.raises(DistillError, match=f"precision={resumed}"):
        distill(tiny(iterations=6, select_on="none", precision=other), experts=experts, out=out, progress=False)


def test_tesla_memory_mode_is_labelled_approximate_and_cannot_be_switched_on_resume(experts, tmp_path):
    out = tmp_path / "run"
    r = distill(tiny(iterations=4, stop_after=2, select_on="none", memory="tesla"), experts=experts, out=out,
                progress=False)
    assert r.init_info["memory"]["mode"] == "tesla" and r.init_info["memory"]["exact"] is False
    assert "APPROXIMATE" in r.init_info["memory"]["why"]
    for other in ("checkpoint", "auto"):
        with pytest.raises(DistillError, match="memory=tesla"):
            distill(tiny(iterations=4, select_on="none", memory=other), experts=experts, out=out, progress=False)
    r = distill(tiny(iterations=4, select_on="none", memory="tesla"), experts=experts, out=out, progress=False)
    assert len(r.history) == 4 and all(math.isfinite(h["loss"]) for h in r.history)
    from mttlss.artifact import format_manifest, read_manifest

    assert "unroll memory tesla (APPROXIMATE gradients)" in format_manifest(read_manifest(r.artifact))
    other = tmp_path / "exact"
    exact = distill(tiny(iterations=4, stop_after=2, select_on="none", memory="checkpoint"), experts=experts,
                    out=other, progress=False)
    assert exact.init_info["memory"]["exact"] is True
    with pytest.raises(DistillError, match="memory=checkpoint"):
        distill(tiny(iterations=4, select_on="none", memory="tesla"), experts=experts, out=other, progress=False)


def _distill_rank(rank: int, world_size: int, port: int, experts_dir: str, out: str, result: str) -> None:
    import os

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    r = distill(tiny(iterations=4, select_on="none", memory="checkpoint", batch_syn=6), experts=experts_dir, out=out,
                progress=False)
    torch.save({"losses": [h["loss"] for h in r.history], "state": r.synthetic.state_dict(), "labels": r.labels,
                "lr": r.syn_lr, "artifact": str(r.artifact)}, f"{result}.{rank}")
    torch.distributed.destroy_process_group()


def test_two_torchrun_ranks_distill_the_single_process_set_and_rank_0_alone_writes(experts_dir, tmp_path):
    import socket

    one = distill(tiny(iterations=4, select_on="none", memory="checkpoint", batch_syn=6), experts=experts_dir,
                  out=tmp_path / "one", progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = str(tmp_path / "rank")
    torch.multiprocessing.spawn(_distill_rank, args=(2, port, str(experts_dir), str(tmp_path / "two"), result), nprocs=2)
    ranks = [torch.load(f"{result}.{r}", weights_only=True) for r in range(2)]
    for got in ranks:
        assert got["losses"] == pytest.approx([h["loss"] for h in one.history], rel=1e-4)
        for key, value in one.synthetic.state_dict().items():
            assert torch.allclose(got["state"][key], value, rtol=1e-3, atol=1e-5), key
        assert torch.allclose(got["labels"], one.labels, rtol=1e-3, atol=1e-5)
    assert ranks[0]["artifact"].endswith("synthetic.safetensors") and ranks[1]["artifact"] == "None"
    lines = (tmp_path / "two" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 4  # one writer: no record twice


def test_a_run_whose_every_update_was_skipped_says_so(experts, capsys):
    from mttlss.distillation import _STALL_AFTER

    distill(tiny(iterations=_STALL_AFTER, threshold=0.0, threshold_probe=0), experts=experts, out=None, progress=False)
    err = capsys.readouterr().err
    assert f"all {_STALL_AFTER} updates were skipped" in err and "threshold=0" in err


# ---------------------------------------------------------------------------------------------------------
# the update guard's probe at the start (threshold_probe)


def _losses(history):
    return [r["loss"] for r in history]


def test_a_guard_that_would_block_every_update_is_lifted_and_the_run_is_the_unguarded_one(experts, tmp_path, capsys):
    # threshold 0: every segment's loss exceeds it, as every one did with one-epoch CIFAR-10 experts at threshold 1
    lifted = distill(tiny(iterations=6, threshold=0.0), experts=experts, out=tmp_path / "lifted", progress=True)
    err = capsys.readouterr().err
    unguarded = distill(tiny(iterations=6, threshold=1e9, threshold_probe=0), experts=experts, out=None, progress=False)
    guard = lifted.init_info["guard"]
    assert guard["lifted"] is True and len(guard["probe_losses"]) == 3
    assert "update guard lifted: the first 3 segments" in err and "threshold_probe=0" in err
    assert not any(r["skipped"] for r in lifted.history)
    assert _losses(lifted.history) == _losses(unguarded.history)  # the probe draws nothing the run draws
    for key, value in unguarded.synthetic.state_dict().items():
        assert torch.equal(lifted.synthetic.state_dict()[key], value), key
    # the probe measured the segments the run then matched, on the same initial set
    assert guard["probe_losses"][0] == pytest.approx(lifted.history[0]["loss"], rel=1e-5)
    from mttlss.cli import main as cli_main

    out = cli_main(["info", str(tmp_path / "lifted" / "synthetic.safetensors")])
    assert out == 0 and "update guard  lifted" in capsys.readouterr().out


def test_a_guard_that_lets_some_probed_segment_through_stays_on(experts):
    probed = distill(tiny(iterations=3, threshold=1e9), experts=experts, out=None, progress=False)
    guard = probed.init_info["guard"]
    assert guard["lifted"] is False and "are skipped" in guard["why"]
    losses = sorted(guard["probe_losses"])
    # a threshold between the probed losses: one segment gets through, so the guard keeps skipping the others
    middle = (losses[0] + losses[1]) / 2
    kept = distill(tiny(iterations=3, threshold=middle), experts=experts, out=None, progress=False)
    assert kept.init_info["guard"]["lifted"] is False
    assert [r["skipped"] for r in kept.history] == [r["loss"] > middle for r in kept.history]
    assert any(r["skipped"] for r in kept.history)


@pytest.mark.parametrize("lifted", [True, False])
def test_the_start_s_guard_decision_is_kept_on_resume(experts, tmp_path, monkeypatch, lifted):
    import mttlss.distillation as distill_mod

    probed = distill(tiny(iterations=3, threshold=1e9), experts=experts, out=None, progress=False)
    losses = sorted(probed.init_info["guard"]["probe_losses"])
    # threshold 0 lifts the guard; one between the probed losses keeps it on (and skips the segments above it)
    threshold = 0.0 if lifted else (losses[0] + losses[1]) / 2
    whole = distill(tiny(iterations=8, threshold=threshold), experts=experts, out=tmp_path / "a", progress=False)
    distill(tiny(iterations=8, threshold=threshold, stop_after=3), experts=experts, out=tmp_path / "b", progress=False)

    def no_probe(*args, **kwargs):
        raise AssertionError("a resumed run must read the start's decision, not probe again")

    monkeypatch.setattr(distill_mod, "settle_guard", no_probe)
    resumed = distill(tiny(iterations=8, threshold=threshold), experts=experts, out=tmp_path / "b", progress=False)
    assert resumed.init_info["guard"]["lifted"] is lifted
    assert [r["skipped"] for r in resumed.history] == [r["skipped"] for r in whole.history]
    assert _losses(resumed.history) == pytest.approx(_losses(whole.history), rel=1e-6)
    if lifted:
        assert not any(r["skipped"] for r in resumed.history)


def test_a_probe_loss_that_is_not_finite_never_lifts_the_guard(experts, monkeypatch):
    import mttlss.distillation as distill_mod

    real = distill_mod.segment_loss
    calls = []

    def first_infinite(*args, **kwargs):
        loss, record = real(*args, **kwargs)
        calls.append(record["iteration"])
        if len(calls) == 1:  # the probe's first segment
            return loss, {**record, "loss": float("inf")}
        return loss, record

    monkeypatch.setattr(distill_mod, "segment_loss", first_infinite)
    run = distill(tiny(iterations=3, threshold=0.0, max_consecutive_skips=5), experts=experts, out=None, progress=False)
    guard = run.init_info["guard"]
    assert guard["lifted"] is False and guard["probe_losses"][0] is None
    assert json.loads(json.dumps(guard, allow_nan=False)) == guard  # strict JSON: no Infinity token


def test_threshold_probe_must_not_be_negative():
    with pytest.raises(ValueError, match="threshold_probe must be >= 0.*0 turns the probe off"):
        tiny(threshold_probe=-1)


# ---------------------------------------------------------------------------------------------------------
# ema_decay: an EMA of the synthetic set (method.md 11.4)


def _state(syn):
    return {k: v.detach().clone() for k, v in syn.state_dict().items()}


def test_ema_update_is_the_hand_computed_average_of_every_factor():
    from mttlss.ema import averaged_set, new_ema, update_ema
    from mttlss.parameterization import LowRankSet

    syn = LowRankSet(num_classes=2, image_shape=(1, 4, 4), images_per_class=2, rank=2, subspaces="shared")
    gen = torch.Generator().manual_seed(0)
    values = [{k: torch.randn(v.shape, generator=gen) for k, v in syn.state_dict().items()} for _ in range(3)]
    syn.load_state_dict(values[0])
    ema = new_ema(syn, 0.9)
    for v in values[1:]:  # two updates
        syn.load_state_dict(v)
        update_ema(ema, syn)
    got = averaged_set(ema).state_dict()
    assert set(got) == {"mappers_U", "mappers_V", "codes"}  # the mappers and the codes, all of them
    for k in got:
        expected = 0.9 * (0.9 * values[0][k] + 0.1 * values[1][k]) + 0.1 * values[2][k]
        torch.testing.assert_close(got[k], expected, atol=1e-6, rtol=0)
        assert not torch.equal(got[k], values[2][k])
    assert int(ema.n_averaged) == 3 and not any(p.requires_grad for p in averaged_set(ema).parameters())
    assert new_ema(syn, None) is None and new_ema(syn, 0.0) is None  # off


def test_ema_validation_selection_and_artifact_use_the_average_of_the_raw_sets(experts, tmp_path, monkeypatch):
    import mttlss.distillation as distillation

    decay, k_max = 0.5, 3
    knobs = dict(labels="soft", label_temperature=1.0, eval_every=1)  # one label candidate: no validation chooses it
    raw = [distill(tiny(iterations=k, select_on="none", **knobs), experts=experts, out=None, progress=False)
           for k in range(k_max + 1)]  # raw[k]: the set after k iterations, without an average
    seen, scores = [], iter(range(100))

    def fake_evaluate(*, images, **kw):  # each validation scores higher: the last one is selected
        seen.append(images.clone())
        return {"mean": next(scores) / 100}

    monkeypatch.setattr(distillation, "evaluate_synthetic", fake_evaluate)
    r = distill(tiny(iterations=k_max, ema_decay=decay, **knobs), experts=experts, out=tmp_path / "ema", progress=False)
    expected = _state(raw[0].synthetic)
    for k in range(1, k_max + 1):
        if not raw[k].history[-1]["skipped"]:
            expected = {n: decay * e + (1 - decay) * raw[k].synthetic.state_dict()[n] for n, e in expected.items()}
    art = mttlss.load(r.artifact)
    final_raw = _state(raw[k_max].synthetic)
    for n, e in expected.items():
        torch.testing.assert_close(art.synthetic.state_dict()[n], e, atol=1e-6, rtol=0)
        assert (art.synthetic.state_dict()[n] - final_raw[n]).abs().max() > 1e-3, n  # not the raw set
    torch.testing.assert_close(r.labels, raw[k_max].labels, atol=1e-6, rtol=0)  # labels are not averaged
    assert r.syn_lr == pytest.approx(raw[k_max].syn_lr, abs=1e-9)  # nor is alpha
    assert len(seen) == k_max + 1 and torch.equal(seen[-1], art.images())  # validation scored the average
    sel = art.manifest["selection"]
    assert sel["iteration"] == k_max and sel["set"] == "ema" and sel["ema_decay"] == decay
    assert art.manifest["config"]["ema_decay"] == decay
    from mttlss.artifact import format_manifest

    assert "set=ema (ema_decay=0.5)" in format_manifest(art.manifest)


def test_ema_survives_an_interrupted_run_bit_for_bit(experts, tmp_path):
    from safetensors import safe_open

    def tensors(path):
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    cfg = dict(ema_decay=0.8, eval_every=4)  # iteration 4 is validated in both runs
    a = distill(tiny(iterations=8, **cfg), experts=experts, out=tmp_path / "a", progress=False)
    distill(tiny(iterations=4, **cfg), experts=experts, out=tmp_path / "b", progress=False)  # interrupted after 4
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ckpt["iteration"] == 4 and int(ckpt["ema"]["n_averaged"]) > 1
    assert not torch.equal(ckpt["ema"]["module.codes"], ckpt["state"]["synthetic"]["codes"])  # an average to restore
    b = distill(tiny(iterations=8, **cfg), experts=experts, out=tmp_path / "b", progress=False)
    ta, tb = tensors(a.artifact), tensors(b.artifact)
    assert ta.keys() == tb.keys() and "synthetic.codes" in ta
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert b.selection == a.selection and a.selection["set"] == "ema"
    ea = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["ema"]
    eb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["ema"]
    assert all(torch.equal(ea[key], eb[key]) for key in ea)


def test_ema_is_not_updated_by_a_skipped_iteration(experts, tmp_path):
    distill(tiny(iterations=3, threshold=0.0, threshold_probe=0, ema_decay=0.5, select_on="none"), experts=experts, out=tmp_path / "r",
            progress=False)
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert int(ckpt["ema"]["n_averaged"]) == 1  # only its start: every update was skipped
    for key, value in ckpt["state"]["synthetic"].items():
        assert torch.equal(ckpt["ema"][f"module.{key}"], value), key


@pytest.mark.parametrize("decay", [1.0, 1.5, -0.1, float("nan")])
def test_ema_decay_outside_0_1_is_refused_naming_the_fix(decay):
    with pytest.raises(ValueError, match=r"ema_decay must lie in \[0, 1\).*null or 0 to turn the average off"):
        tiny(ema_decay=decay)


def test_ema_decay_is_a_set_override(experts):
    from mttlss.config import parse_set

    assert resolve_config(overrides=parse_set(["ema_decay=0.9995"])).ema_decay == 0.9995
    r = distill(tiny(iterations=2, ema_decay=0, select_on="none"), experts=experts, out=None, progress=False)
    assert "set" not in r.selection  # 0 is off: the raw set


def test_validation_in_repaired_epochs_re_decodes_the_set(experts, monkeypatch):
    import mttlss.training as training

    calls = []
    original = training.repaired_images
    monkeypatch.setattr(training, "repaired_images", lambda s, **kw: calls.append(s.pairing) or original(s, **kw))
    cfg = tiny(iterations=2, eval_every=2, eval_epochs=3, pairing="random", num_subspaces=2,
               eval_epoch_mode="repaired", select_on="val")
    r = distill(cfg, experts=experts, out=None, progress=False)
    assert calls and set(calls) == {"random"} and len(calls) % 3 == 0  # 3 epochs per validation network
    assert r.synthetic.pairing == "random"
