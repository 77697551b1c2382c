import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from bridge import Calibrator, ExportError
from bridge.export import files as export_mod
from jaxq import QuantConfig

CFG = QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True)


@pytest.fixture
def calibrated(digits_model, digits_calib):
    return Calibrator(digits_model, CFG, digits_calib, progress=False).run()


def test_safetensors_and_json_hold_every_parameter(calibrated, tmp_path):
    files = calibrated.export_param(tmp_path / "out")
    assert [f.name for f in files] == [
        "quant_params.safetensors",
        "quant_params.json",
        "float_params.safetensors",
        "jaxq_manifest.json",
    ]
    tensors = load_file(str(tmp_path / "out" / "quant_params.safetensors"))
    names = ("input_scale", "input_offset", "weight_scale", "weight_offset", "quant_weight")
    for key, per_layer in zip(names, calibrated.get_quant_params()):
        for layer, arr in per_layer.items():
            np.testing.assert_array_equal(tensors[f"{layer}.{key}"], arr)
            assert tensors[f"{layer}.{key}"].dtype == arr.dtype
    desc = json.loads((tmp_path / "out" / "quant_params.json").read_text())
    assert desc["config"]["quant_mode"] == 1 and desc["format_version"] == 1
    assert desc["layers"]["features.3"]["kind"] == "conv2d"
    assert desc["layers"]["classifier.1"]["act_scheme"]["qmax"] == 255
    assert desc["layers"]["classifier.1"]["weight_scheme"]["axis"] == 0
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".jaxq")]


def test_legacy_layout_is_msmodelslim_pickled_dicts(calibrated, tmp_path):
    calibrated.export_param(tmp_path, legacy=True)
    qw = np.load(tmp_path / "quant_weight.npy", allow_pickle=True).item()
    np.testing.assert_array_equal(qw["features.0"], calibrated.get_quant_params()[4]["features.0"])
    assert set(np.load(tmp_path / "input_scale.npy", allow_pickle=True).item()) == set(calibrated.quantized_names)


def test_export_is_deterministic(calibrated, tmp_path):
    calibrated.export_param(tmp_path / "a", legacy=True)
    calibrated.export_param(tmp_path / "b", legacy=True)
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name


def test_failure_mid_write_leaves_no_files(calibrated, tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("user file")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_mod.np, "save", boom)
    with pytest.raises(OSError, match="No space"):
        calibrated.export_param(target, legacy=True)
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


def test_target_that_cannot_be_created(calibrated, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="cannot create export directory"):
        calibrated.export_param(blocker / "sub")
    with pytest.raises(ExportError):
        calibrated.export_param(blocker)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_target(calibrated, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ExportError, match="not writable"):
            calibrated.export_param(ro)
    finally:
        ro.chmod(0o755)
    assert list(ro.iterdir()) == []


def test_read_only_target_as_seen_by_os_access(calibrated, tmp_path, monkeypatch):
    """Same check where root would bypass permissions: os.access is what decides."""
    monkeypatch.setattr(export_mod.os, "access", lambda *a, **k: False)
    with pytest.raises(ExportError, match="not writable"):
        calibrated.export_param(tmp_path / "x")


def test_export_before_run(digits_model, digits_calib, tmp_path):
    cal = Calibrator(digits_model, CFG, digits_calib, progress=False)
    with pytest.raises(RuntimeError, match="run"):
        cal.export_param(tmp_path)
