import json

import pytest
import torch

from mttlss.experts import ExpertConfig, ExpertError, ExpertSet, expert_path, import_reference, train_experts
from mttlss.models import build_model, model_spec

from conftest import tiny_expert_config


def _cfg(**kw) -> ExpertConfig:
    # small and quick: 1 expert x 2 epochs unless asked otherwise
    base = dict(num_experts=1, epochs=2)
    base.update(kw)
    return tiny_expert_config(**base)


def _digits_model(width=16, depth=2):
    return build_model(model_spec("convnet", width=width, depth=depth), channels=1, num_classes=10, image_size=(8, 8))


def test_train_writes_files_manifest_and_learns(tmp_path):
    ex = train_experts(_cfg(epochs=2), tmp_path / "ex", progress=False)
    folder = tmp_path / "ex"
    for name in ("expert_000.safetensors", "manifest.json", "preprocess.safetensors"):
        assert (folder / name).is_file(), name
    m = json.loads((folder / "manifest.json").read_text())
    for key in ("dataset", "model", "parameter_layout", "optimizer", "epochs", "preprocessing"):
        assert key in m, key
    assert m["dataset"]["name"] == "digits" and m["epochs"] == 2
    assert m["model"]["width"] == 16
    traj = ex.trajectory(0)
    assert traj.shape == (3, ex.num_params) == (3, m["num_params"])
    assert not torch.equal(traj[0], traj[-1])
    # chance is 0.1 on 10 classes; 2 epochs of SGD at 0.01 reach ~0.2 on this seed
    assert ex.metrics(0)["final_val_acc"] > 0.1 + 0.05
    assert ex.metrics(0)["train_loss"][-1] < ex.metrics(0)["train_loss"][0]


def test_resume_keeps_finished_and_trains_missing(tmp_path):
    out = tmp_path / "ex"
    train_experts(_cfg(num_experts=1, epochs=1), out, progress=False)
    first = expert_path(out, 0)
    before_bytes, before_mtime = first.read_bytes(), first.stat().st_mtime_ns
    # what kill -9 in the middle of writing expert 1 leaves behind: a stray temp file
    (out / ".expert_001.safetensors.abc123.tmp").write_bytes(b"half written")
    ex = train_experts(_cfg(num_experts=3, epochs=1), out, progress=False)
    assert ex.indices == [0, 1, 2]
    assert first.read_bytes() == before_bytes and first.stat().st_mtime_ns == before_mtime
    # the missing experts are real trajectories with their own seeds
    assert not torch.equal(ex.trajectory(1), ex.trajectory(2))
    assert ExpertSet(out).metrics(1)["seed"] == 1


def test_deleted_expert_is_retrained_identically(tmp_path):
    out = tmp_path / "ex"
    ex = train_experts(_cfg(num_experts=2, epochs=1), out, progress=False)
    kept = expert_path(out, 0).stat().st_mtime_ns
    traj1 = ex.trajectory(1)
    expert_path(out, 1).unlink()
    ex = train_experts(_cfg(num_experts=2, epochs=1), out, progress=False)
    assert expert_path(out, 0).stat().st_mtime_ns == kept
    assert torch.equal(ex.trajectory(1), traj1)


def test_rerun_with_other_settings_fails(tmp_path):
    out = tmp_path / "ex"
    train_experts(_cfg(epochs=1), out, progress=False)
    with pytest.raises(ExpertError, match="other settings"):
        train_experts(_cfg(epochs=1, lr=0.05), out, progress=False)


def test_same_seed_same_trajectory(tmp_path):
    a = train_experts(_cfg(epochs=1), tmp_path / "a", progress=False)
    b = train_experts(_cfg(epochs=1), tmp_path / "b", progress=False)
    assert torch.equal(a.trajectory(0), b.trajectory(0))
    c = train_experts(_cfg(epochs=1, seed=5), tmp_path / "c", progress=False)
    assert not torch.equal(a.trajectory(0), c.trajectory(0))


def test_workers_give_the_same_experts(tmp_path):
    one = train_experts(_cfg(num_experts=2, epochs=1), tmp_path / "one", progress=False)
    two = train_experts(_cfg(num_experts=2, epochs=1), tmp_path / "two", workers=2, progress=False)
    for k in (0, 1):
        # bitwise equal here because conftest pins torch to 1 thread and each worker also gets 1; with
        # different intra-op thread counts the float reductions could be ordered differently (then compare
        # with atol ~1e-5 instead)
        assert torch.equal(two.trajectory(k), one.trajectory(k)), k


def test_check_model_rejects_other_width(experts_dir):
    ex = ExpertSet(experts_dir)
    ex.check_model(_digits_model(width=16))  # the right one passes
    with pytest.raises(ExpertError, match="does not match the experts"):
        ex.check_model(_digits_model(width=8))


def test_damaged_expert_file_names_the_file(tmp_path, experts_dir):
    out = tmp_path / "ex"
    out.mkdir()
    for p in experts_dir.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    path = expert_path(out, 1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ex = ExpertSet(out)
    ex.trajectory(0)  # the intact one still reads
    with pytest.raises(ExpertError, match="expert_001.safetensors"):
        ex.trajectory(1)


def test_missing_folder_message(tmp_path):
    with pytest.raises(ExpertError, match="mttlss experts"):
        ExpertSet(tmp_path / "nothing")


def _reference_buffer(model, num_experts=2, epochs=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [p.shape for _, p in model.named_parameters()]
    return [[[torch.randn(s, generator=gen) for s in shapes] for _ in range(epochs + 1)] for _ in range(num_experts)]


def test_import_reference_buffer(tmp_path):
    spec = model_spec("convnet", width=16, depth=2)
    model = _digits_model()
    buf = _reference_buffer(model)
    torch.save(buf, tmp_path / "replay_buffer_0.pt")
    ex = import_reference([tmp_path / "replay_buffer_0.pt"], tmp_path / "imported",
                          cfg=ExpertConfig(dataset="digits", model=spec, val_fraction=0.0, normalization="computed"))
    assert ex.indices == [0, 1] and ex.epochs == 2
    for k in range(2):
        expected = torch.stack([torch.cat([t.reshape(-1) for t in epoch]) for epoch in buf[k]])
        assert torch.equal(ex.trajectory(k), expected)
    assert ex.dataset["split"]["val_fraction"] == 0.0


def test_import_rejects_wrong_shapes(tmp_path):
    buf = _reference_buffer(_digits_model(width=8))
    torch.save(buf, tmp_path / "replay_buffer_0.pt")
    with pytest.raises(ExpertError, match="do not match the model"):
        import_reference([tmp_path / "replay_buffer_0.pt"], tmp_path / "imported",
                         cfg=ExpertConfig(dataset="digits", model=model_spec("convnet", width=16, depth=2), val_fraction=0.0,
                                          normalization="computed"))


def test_gsam_experts_record_their_optimiser_and_load_back(tmp_path):
    out = tmp_path / "gsam"
    ex = train_experts(_cfg(epochs=1, optimizer="gsam", gsam_alpha=1.0), out, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["optimizer"] == {"name": "gsam", "base": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0,
                              "batch_size": 128, "schedule": "constant", "rho": 0.01, "rho_schedule": "constant",
                              "alpha": 1.0}
    assert (m["identity"]["optimizer"], m["identity"]["gsam_rho"], m["identity"]["gsam_alpha"]) == ("gsam", 0.01, 1.0)
    back = ExpertSet(out)
    assert back.indices == [0] and back.trajectory(0).shape == (2, back.num_params)
    # the same seed, another optimiser: the same initialisation (row 0), another first epoch
    sgd = train_experts(_cfg(epochs=1), tmp_path / "sgd", progress=False)
    assert torch.equal(sgd.trajectory(0)[0], ex.trajectory(0)[0])
    assert not torch.equal(sgd.trajectory(0)[1], ex.trajectory(0)[1])
    # SGD folders keep the identity they had before GSAM existed, so they still resume
    assert not {"optimizer", "gsam_rho", "gsam_alpha"} & set(sgd.manifest["identity"])


def test_resume_with_another_optimiser_is_refused(tmp_path):
    out = tmp_path / "ex"
    train_experts(_cfg(epochs=1, optimizer="gsam"), out, progress=False)
    with pytest.raises(ExpertError, match="trained with --optimizer gsam --gsam-rho 0.01 --gsam-alpha 0.3, not --optimizer sgd"):
        train_experts(_cfg(epochs=1), out, progress=False)
    with pytest.raises(ExpertError, match="not --optimizer gsam --gsam-rho 0.05"):
        train_experts(_cfg(epochs=1, optimizer="gsam", gsam_rho=0.05), out, progress=False)
    assert train_experts(_cfg(num_experts=2, epochs=1, optimizer="gsam"), out, progress=False).indices == [0, 1]
    sgd = tmp_path / "sgd"
    train_experts(_cfg(epochs=1), sgd, progress=False)
    with pytest.raises(ExpertError, match="trained with --optimizer sgd, not --optimizer gsam"):
        train_experts(_cfg(epochs=1, optimizer="gsam"), sgd, progress=False)


@pytest.mark.parametrize("kw", [dict(optimizer="adam"), dict(optimizer="gsam", gsam_rho=-1.0)])
def test_bad_optimiser_settings_are_refused(kw):
    with pytest.raises(ExpertError, match="pass"):
        _cfg(**kw)


def test_cli_optimizer_flags(tmp_path, capsys):
    from mttlss import cli

    base = ["experts", "--dataset", "digits", "--width", "8", "--depth", "1", "--num-experts", "1", "--epochs", "1",
            "--batch-size", "128"]
    assert cli.main([*base, "--optimizer", "gsam", "--gsam-alpha", "1", "--out", str(tmp_path / "ex")]) == 0
    m = json.loads((tmp_path / "ex" / "manifest.json").read_text())
    assert (m["optimizer"]["name"], m["optimizer"]["rho"], m["optimizer"]["alpha"]) == ("gsam", 0.01, 1.0)
    capsys.readouterr()
    assert cli.main([*base, "--gsam-rho", "0.05", "--out", str(tmp_path / "sgd")]) == 2
    assert "--gsam-rho is only for GSAM experts; add --optimizer gsam, or drop it" in capsys.readouterr().err
    assert not (tmp_path / "sgd").exists()
