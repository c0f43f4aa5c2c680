import pytest

from mttlss.config import DistillConfig, apply_overrides, config_keys, load_preset, parse_set, preset_names, resolve_config


def test_all_presets_load_and_validate():
    names = preset_names()
    assert "cifar10_ipc1_lowrank" in names and len(names) >= 6
    for name in names:
        cfg = resolve_config(preset=name)
        assert isinstance(cfg, DistillConfig)
        assert name.split("_")[-1] == cfg.param, name
        assert f"_ipc{cfg.ipc}_" in name, name


def test_preset_then_overrides_order():
    cfg = resolve_config(preset="cifar10_ipc1_lowrank", iterations=7, overrides={"iterations": 9})
    assert cfg.iterations == 9  # --set wins over keyword arguments, which win over the preset


def test_parse_set_values():
    got = parse_set(["lr_img=1e3", "batch_syn=null", "progressive=false", "syn_steps=30", "param=pixel"])
    assert got == {"lr_img": 1000.0, "batch_syn": None, "progressive": False, "syn_steps": 30, "param": "pixel"}
    assert isinstance(got["lr_img"], float)
    cfg = resolve_config(overrides=got, current_max_start_epoch=10)
    assert cfg.lr_img == 1000.0 and cfg.batch_syn is None and cfg.progressive is False and cfg.syn_steps == 30


def test_parse_set_needs_equals():
    with pytest.raises(ValueError, match="key=value"):
        parse_set(["lr_img"])


def test_unknown_key_lists_valid_keys():
    with pytest.raises(KeyError) as info:
        resolve_config(overrides={"lr_imgs": 10.0})
    msg = str(info.value)
    assert "lr_imgs" in msg and "lr_img" in msg and "syn_steps" in msg
    assert set(config_keys()) >= {"lr_img", "syn_steps", "expert_epochs", "max_start_epoch"}


def test_wrong_type_rejected():
    with pytest.raises(ValueError, match="syn_steps"):
        resolve_config(overrides={"syn_steps": "many"})
    with pytest.raises(ValueError, match="progressive"):
        apply_overrides({}, {"progressive": "maybe"})
    with pytest.raises(ValueError, match="syn_steps"):
        apply_overrides({}, {"syn_steps": 2.5})
    assert apply_overrides({}, {"syn_steps": 3.0})["syn_steps"] == 3


def test_negative_step_size_rejected():
    with pytest.raises(ValueError, match="lr_teacher must be positive"):
        resolve_config(overrides=parse_set(["lr_teacher=-1"]))
    with pytest.raises(ValueError, match="lr_img"):
        resolve_config(lr_img=0.0)


def test_bad_choice_and_window_rejected():
    with pytest.raises(ValueError, match="'lowrank', 'pixel'"):
        resolve_config(param="pixels")
    with pytest.raises(ValueError, match="max_start_epoch"):
        resolve_config(min_start_epoch=5, max_start_epoch=5)


def test_unknown_preset_lists_shipped():
    with pytest.raises(KeyError, match="cifar10_ipc1_lowrank"):
        load_preset("no_such_preset")


def test_preset_scientific_notation_is_a_float():
    # YAML 1.1 reads "1e-07" (no dot) as a string; the preset loader must still give the float
    cfg = resolve_config(preset="cifar10_ipc1_lowrank")
    assert isinstance(cfg.lr_lr, float) and cfg.lr_lr == pytest.approx(1e-7)
    with pytest.raises(ValueError, match="lr_img"):
        apply_overrides({}, {"lr_img": "fast"})
