"""Reliability: the quantized model stays true while the user keeps working with it —
fine-tuning, copying, reloading, restoring and re-exporting after `run()`."""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import bridge
from bridge import Calibrator
from bridge.export import MANIFEST_NAME, ExportError
from bridge.models.digits import digits_split, load_digits_cnn
from bridge.export.reload import ParamFileError
from jaxq import QuantConfig

W8A8 = QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True)


def _fine_tune(model, steps=3):
    x_train, y_train, _, _ = digits_split()
    x, y = x_train[:64], torch.as_tensor(y_train[:64])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.fixture
def fine_tuned(digits_calib):
    model = load_digits_cnn()
    cal = Calibrator(model, W8A8, digits_calib, progress=False).run()
    before = [a.copy() for a in cal.get_quant_params()[4].values()]
    _fine_tune(model)
    return cal, before


def test_export_after_fine_tuning_reloads_the_model_in_memory(fine_tuned, digits_calib, tmp_path):
    cal, codes_at_run = fine_tuned
    x = digits_calib[0]
    now = cal.get_quant_params()[4]
    assert any((a != b).any() for a, b in zip(codes_at_run, now.values())), "fine-tuning changed no code"
    cal.export_param(tmp_path / "p")
    with torch.no_grad():
        expected = cal.model(x)
        assert torch.equal(bridge.load_quantized(load_digits_cnn(), tmp_path / "p")(x), expected)
        fresh = Calibrator(load_digits_cnn(), W8A8, digits_calib, progress=False)
        assert torch.equal(fresh.load_param(tmp_path / "p").model(x), expected)
    # get_quant_params describes the model in memory: its codes are what each fake-quant weight computes
    for name, q in cal.quantizers.items():
        shape = (-1,) + (1,) * (q.float_weight.dim() - 1)
        s, o = q.weight_scale.reshape(shape), q.weight_offset.reshape(shape)
        assert torch.equal((torch.from_numpy(now[name]).float() - o) * s, q.fake_quant_weight().detach())


def test_reload_carries_biases_and_restore_model_gives_the_float_model_back(fine_tuned, digits_calib, tmp_path):
    cal, _ = fine_tuned
    cal.export_param(tmp_path / "p")
    other = load_digits_cnn()
    with torch.no_grad():
        other.classifier[3].bias.add_(5.0)  # a float model with other biases and BN statistics
        other.features[1].running_mean.add_(1.0)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    x = digits_calib[0]
    with torch.no_grad():
        assert torch.equal(bridge.load_quantized(other, tmp_path / "p")(x), cal.model(x))
    bridge.restore_model(other)
    assert all(torch.equal(state[k], v) for k, v in other.state_dict().items())


def test_reload_into_another_architecture_names_the_tensor(digits_calib, tmp_path):
    cal = Calibrator(load_digits_cnn(), W8A8, digits_calib, progress=False).run()
    cal.export_param(tmp_path / "p")
    other = load_digits_cnn()
    other.classifier[3].register_buffer("temperature", torch.ones(()))
    with pytest.raises(ParamFileError, match="temperature"):
        bridge.load_quantized(other, tmp_path / "p")
    assert not bridge.inplace.fakequant.model_quantizers(other)


def test_restore_after_fine_tuning_gives_the_fine_tuned_float_model(digits_calib):
    model = load_digits_cnn()
    types = [type(m) for m in model.modules()]
    cal = Calibrator(model, W8A8, digits_calib, progress=False).run()
    _fine_tune(model)
    x = digits_calib[0]
    with torch.no_grad(), cal.quantization(False):
        trained_float = model(x)
    cal.restore()
    assert [type(m) for m in model.modules()] == types  # BNs back, no jaxq classes
    with torch.no_grad():
        assert torch.allclose(model(x), trained_float, atol=1e-4, rtol=1e-4)  # conv/BN unfolded by the inverse map
        assert not torch.allclose(model(x), load_digits_cnn()(x), atol=1e-3)


def test_restore_without_training_is_bit_exact(model_and_ref, digits_calib, assert_unchanged):
    model, x, ref, before = model_and_ref
    cal = Calibrator(model, W8A8, digits_calib, progress=False).run()
    cal.get_quant_params()
    cal.restore()
    assert_unchanged(model, before, x, ref)


def test_deep_copy_is_independent_of_restore(digits_calib):
    model = load_digits_cnn()
    cal = Calibrator(model, W8A8, digits_calib, progress=False).run()
    x = digits_calib[0]
    clone = copy.deepcopy(cal.model)
    with torch.no_grad():
        expected = cal.model(x)
        cal.restore()
        assert torch.equal(clone(x), expected)
        with torch.no_grad():
            clone.classifier[3].bias.add_(1.0)
        assert not torch.equal(model(x), clone(x))


class _Scale(nn.Module):
    def forward(self, w):
        return w * 1.5


def _parametrized_model():
    torch.manual_seed(0)
    m = nn.Sequential(
        parametrizations.weight_norm(nn.Conv1d(4, 8, 3)),
        nn.ReLU(),
        nn.Flatten(),
        parametrizations.spectral_norm(nn.Linear(48, 16)),
        nn.ReLU(),
        nn.Linear(16, 3),
    )
    parametrize.register_parametrization(m[5], "weight", _Scale())
    return m.eval()


def test_user_parametrizations_quantize_the_effective_weight_and_restore_exactly():
    model = _parametrized_model()
    x = torch.randn(4, 4, 8)
    calib = [torch.randn(4, 4, 8) for _ in range(3)]
    with torch.no_grad():
        ref = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    cal = Calibrator(model, W8A8, calib, progress=False).run()
    assert len(cal.quantized_names) == 3
    w = cal.quantizers["5"].float_weight
    assert torch.allclose(w, model[5].parametrizations.weight.original * 1.5)  # the effective weight is quantized
    with torch.no_grad():
        assert 0 < (model(x) - ref).abs().max() < 0.2
    clone = copy.deepcopy(model)
    cal.restore()
    assert [type(m) for m in model.modules()] == classes
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), ref)
        clone(x)  # the copy still works


def test_failed_run_with_user_parametrizations_leaves_the_model_as_it_was():
    model = _parametrized_model()
    bad = [torch.randn(4, 4, 8) for _ in range(3)]
    bad[1][0, 0, 0] = float("nan")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    with pytest.raises(FloatingPointError):
        Calibrator(model, W8A8, bad, progress=False).run()
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    Calibrator(model, W8A8, [torch.randn(4, 4, 8)], progress=False).run()  # not refused afterwards


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.b(torch.relu(self.a(x)))


def test_calibration_leaves_the_models_own_buffers_as_they_were():
    model = _Counting().eval()
    cal = Calibrator(model, W8A8, [torch.randn(8, 4)] * 3, progress=False).run()
    assert float(model.calls) == 0
    cal.restore()
    assert float(model.calls) == 0


def test_failed_re_export_keeps_the_earlier_export(digits_calib, tmp_path, monkeypatch):
    cal = Calibrator(load_digits_cnn(), W8A8, digits_calib, progress=False).run()
    path = tmp_path / "p"
    cal.export_param(path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    cal4 = Calibrator(load_digits_cnn(), W8A8.replace(w_bit=4), digits_calib, progress=False).run()
    import bridge.export.files as files

    def full_disk(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "_publish", full_disk)
    with pytest.raises(ExportError, match="No space"):
        cal4.export_param(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no staging left behind
    bridge.load_quantized(load_digits_cnn(), path)


def test_export_of_another_model_replaces_earlier_exports_but_not_the_users_files(digits_calib, tmp_path):
    cal = Calibrator(load_digits_cnn(), W8A8, digits_calib, progress=False).run()
    path = tmp_path / "out"
    cal.export_param(path)
    cal.export_quant_safetensor(path)  # the same model: both stay
    assert {"quant_params.json", "quant_model_weight_w8a8.safetensors"} <= {p.name for p in path.iterdir()}
    (path / "notes.txt").write_text("mine")
    other = Calibrator(load_digits_cnn(), W8A8.replace(w_bit=4), digits_calib, progress=False).run()
    other.export_param(path)
    names = {p.name for p in path.iterdir()}
    assert "quant_model_weight_w8a8.safetensors" not in names  # of the W8 model: not beside W4 parameters
    assert (path / "notes.txt").read_text() == "mine"
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert set(manifest["exports"]) == {"params"}


def test_manifest_with_an_entry_deleted_is_refused(digits_calib, tmp_path):
    cal = Calibrator(load_digits_cnn(), W8A8, digits_calib, progress=False).run()
    path = tmp_path / "p"
    cal.export_param(path)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    del manifest["files"]["quant_params.safetensors"]
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ParamFileError, match="does not list.*quant_params.safetensors"):
        bridge.load_quantized(load_digits_cnn(), path)


def test_export_into_a_read_only_parent_names_it(digits_calib, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    cal = Calibrator(load_digits_cnn(), W8A8, digits_calib, progress=False).run()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ExportError, match="not writable"):
            cal.export_param(ro / "p")
    finally:
        ro.chmod(0o700)


def test_export_into_the_working_directory_is_refused(digits_calib, tmp_path, monkeypatch):
    cal = Calibrator(load_digits_cnn(), W8A8, digits_calib, progress=False).run()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ExportError, match="working directory"):
        cal.export_param(".")
    assert list(tmp_path.iterdir()) == []
