"""Reliability: exports publish whole or not at all; loads check everything before touching the model."""

import json

import numpy as np
import pytest
import torch

import bridge
from bridge import Calibrator, ParamFileError, load_quantized
from bridge.export import MANIFEST_NAME
from bridge.inplace.fakequant import model_quantizers
from bridge.models.digits import accuracy, load_digits_cnn
from jaxq import QuantConfig

W8A8 = QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _assert_same(model, before):
    state, types = before
    now = model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], state[k]) for k in state)
    assert [type(m) for m in model.modules()] == types


@pytest.mark.parametrize("bits", [8, 4])
def test_unsigned_weights_round_trip(digits, digits_calib, tmp_path, bits):
    cfg = W8A8.replace(w_signed=False, w_sym=False, w_bit=bits)
    cal = Calibrator(load_digits_cnn(), cfg, digits_calib, progress=False).run()
    codes = cal.get_quant_params()[4]
    assert all(c.dtype == np.uint8 and c.min() >= 0 for c in codes.values())
    assert max(int(c.max()) for c in codes.values()) > (127 if bits == 8 else 7)
    cal.export_param(tmp_path, legacy=True)
    legacy = np.load(tmp_path / "quant_weight.npy", allow_pickle=True).item()
    assert all(np.array_equal(legacy[n], codes[n]) for n in codes)
    fresh = load_quantized(load_digits_cnn(), tmp_path)
    x_test, y_test = digits[2], digits[3]
    with torch.no_grad():
        assert torch.equal(fresh(x_test), cal.model(x_test))
    assert accuracy(fresh, x_test, y_test) > 0.9
    assert not any(q.weight_codes is not None for q in model_quantizers(fresh).values())  # nearest codes, not custom


def test_w8a8_refuses_unsigned_weights(digits_calib, tmp_path):
    cal = Calibrator(load_digits_cnn(), W8A8.replace(w_signed=False), digits_calib, progress=False).run()
    with pytest.raises(bridge.W8A8Error, match="w_signed=False"):
        cal.export_quant_safetensor(tmp_path)
    with pytest.raises(bridge.ExportError, match="overwrite"):
        Calibrator(load_digits_cnn(), W8A8, digits_calib, progress=False).run().export_quant_safetensor(
            tmp_path, "a.bin", "a.bin"
        )


@pytest.fixture
def exported(digits_calib, tmp_path):
    cal = Calibrator(load_digits_cnn(), W8A8, digits_calib, progress=False).run()
    cal.export_param(tmp_path / "p")
    return cal, tmp_path / "p"


def test_stale_files_are_removed_and_manifest_names_every_file(exported, digits_calib):
    cal, path = exported
    Calibrator(load_digits_cnn(), W8A8.replace(w_bit=4), digits_calib, progress=False).run().export_param(
        path, legacy=True
    )
    cal.export_param(path)  # no legacy this time: the W4 .npy files must go
    files = {"quant_params.json", "quant_params.safetensors", "float_params.safetensors"}
    assert sorted(p.name for p in path.iterdir()) == sorted([MANIFEST_NAME, *files])
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == files


def test_interrupted_export_is_refused(exported):
    _cal, path = exported
    (path / MANIFEST_NAME).unlink()  # what a kill between the file moves leaves
    model = load_digits_cnn()
    before = _state(model)
    with pytest.raises(ParamFileError, match="incomplete"):
        load_quantized(model, path)
    _assert_same(model, before)


def test_mixed_or_corrupted_files_are_refused(exported, digits_calib, tmp_path):
    _cal, path = exported
    other = tmp_path / "w4"
    Calibrator(load_digits_cnn(), W8A8.replace(w_bit=4), digits_calib, progress=False).run().export_param(other)
    (path / "quant_params.json").write_bytes((other / "quant_params.json").read_bytes())
    model = load_digits_cnn()
    before = _state(model)
    with pytest.raises(ParamFileError, match=r"quant_params.json.*SHA-256"):
        load_quantized(model, path)
    _assert_same(model, before)


def _rewrite(path, mutate):
    """Change the tensors, then re-sign the manifest (a consistent but wrong export)."""
    from safetensors.numpy import load_file, save_file

    from bridge.export import sha256

    t = load_file(str(path / "quant_params.safetensors"))
    mutate(t)
    save_file(t, str(path / "quant_params.safetensors"))
    m = json.loads((path / MANIFEST_NAME).read_text())
    m["files"]["quant_params.safetensors"] = sha256(path / "quant_params.safetensors")
    (path / MANIFEST_NAME).write_text(json.dumps(m))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda t: t.pop("features.3.weight_scale"), r"'features.3'.*weight_scale"),
        (lambda t: t.__setitem__("features.3.weight_scale", np.ones(10, np.float32)), r"'features.3'.*shape"),
        (
            lambda t: t.__setitem__("features.3.weight_scale", -t["features.3.weight_scale"]),
            r"'features.3'.*non-positive",
        ),
        (lambda t: t.__setitem__("features.3.input_scale", np.array(np.nan, np.float32)), r"'features.3'.*input_scale"),
        (
            lambda t: t.__setitem__("features.3.quant_weight", t["features.3.quant_weight"].astype(np.float32)),
            r"'features.3'.*quant_weight.*dtype",
        ),
    ],
)
def test_bad_tensors_name_file_and_layer_and_leave_the_model(exported, mutate, match):
    _cal, path = exported
    _rewrite(path, mutate)
    model = load_digits_cnn()
    before = _state(model)
    with pytest.raises(ParamFileError, match=match):
        load_quantized(model, path)
    _assert_same(model, before)


def test_load_param_checks_the_stored_config(exported, digits_calib):
    _cal, path = exported
    other = Calibrator(load_digits_cnn(), W8A8.replace(w_bit=4, a_bit=4), digits_calib, progress=False)
    with pytest.raises(ParamFileError, match=r"another config.*w_bit"):
        other.load_param(path)


def test_files_from_before_the_held_out_default_changed_load_where_nothing_was_reconstructed(digits_calib, tmp_path):
    """`recon_holdout` was 0.25 by default; it only matters to BRECQ/QDrop."""
    Calibrator(load_digits_cnn(), W8A8.replace(recon_holdout=0.25), digits_calib, progress=False).run().export_param(
        tmp_path / "p"
    )
    Calibrator(load_digits_cnn(), W8A8, digits_calib, progress=False).load_param(tmp_path / "p")
    brecq = W8A8.replace(keep_acc={"brecq": [True, 1]})
    with pytest.raises(ParamFileError, match=r"another config.*recon_holdout"):
        Calibrator(load_digits_cnn(), brecq, digits_calib, progress=False).load_param(tmp_path / "p")


def test_files_from_before_the_fisher_default_load_where_nothing_fell_back(digits_calib, tmp_path):
    """`amp_metric` was "isolated" by default; it only matters with `amp_num > 0`."""
    old = W8A8.replace(amp_metric="isolated")
    Calibrator(load_digits_cnn(), old, digits_calib, progress=False).run().export_param(tmp_path / "p")
    Calibrator(load_digits_cnn(), W8A8, digits_calib, progress=False).load_param(tmp_path / "p")
    with pytest.raises(ParamFileError, match=r"another config.*amp_metric"):
        Calibrator(load_digits_cnn(), W8A8.replace(amp_num=1), digits_calib, progress=False).load_param(tmp_path / "p")


def test_loading_twice_is_refused_and_restore_model_undoes_a_load(exported, digits_calib):
    _cal, path = exported
    model = load_digits_cnn()
    before = _state(model)
    load_quantized(model, path)
    with pytest.raises(bridge.QuantizedModelError):
        load_quantized(model, path)
    bridge.restore_model(model)
    _assert_same(model, before)


def test_export_arguments_are_checked(digits_calib, tmp_path, monkeypatch):
    cal = Calibrator(load_digits_cnn(), W8A8, digits_calib, progress=False).run()
    with pytest.raises(bridge.ExportError, match="opset_version=7"):
        cal.export_quant_onnx("m", tmp_path / "onnx", opset_version=7)
    with pytest.raises(ValueError, match="bins"):
        cal.activation_histograms(bins=0)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cal.export_param("~/params")
    assert (tmp_path / "home" / "params" / MANIFEST_NAME).is_file() and not (tmp_path / "~").exists()
