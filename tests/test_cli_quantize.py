import json
import textwrap

import numpy as np
import pytest
import torch

from bridge.cli import main


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's directory with a model factory and calibration files."""
    (tmp_path / "mymodels.py").write_text(textwrap.dedent('''
        import torch
        def build():
            from bridge.models.digits import load_digits_cnn
            return load_digits_cnn()
        def data():
            from bridge.models.digits import digits_split
            x = digits_split()[0]
            return [x[i:i + 16] for i in range(0, 64, 16)]
        def not_a_model():
            return 3
    '''))
    from bridge.models.digits import digits_split

    x = digits_split()[0][:64]
    torch.save(x, tmp_path / "calib.pt")
    np.save(tmp_path / "calib.npy", x.numpy())
    (tmp_path / "cfg.json").write_text(json.dumps({"quant_mode": 1, "act_method": 2}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("data", ["calib.pt", "calib.npy", "mymodels:data"])
def test_quantize_writes_chosen_exports(project, data, capsys):
    rc = main(["quantize", "--model", "mymodels:build", "--calib-data", data, "--config", "cfg.json",
               "--quantize-all", "--export", "params", "w8a8", "--out", "out", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "quantized layers  5 of 5" in out and "act_method=2" in out
    for name in ("quant_params.safetensors", "quant_model_weight_w8a8.safetensors", "quant_model_description_w8a8.json"):
        assert (project / "out" / name).is_file()


def test_quantize_flags_override_config(project, capsys):
    rc = main(["quantize", "--model", "mymodels:build", "--calib-data", "calib.pt", "--config", "cfg.json",
               "--w-bit", "4", "--out", "o", "--no-progress"])
    assert rc == 0 and "W4A8" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "mymodels"], "module:function"),
    (["--model", "nosuch:build"], "cannot import"),
    (["--model", "mymodels:not_a_model", "--calib-data", "calib.pt", "--config", "cfg.json"], "not a torch.nn.Module"),
    (["--model", "mymodels:build", "--calib-data", "missing.pt"], "does not exist"),
    (["--model", "mymodels:build", "--config", "cfg.json", "--export", "pdf"], "not known"),
    (["--model", "mymodels:build", "--config", "cfg.json", "--w-bit", "1"], "w_bit=1"),
])
def test_quantize_errors(project, argv, message, capsys):
    assert main(["quantize", *argv, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_quantize_bias_correction_flag_reaches_the_params(project, capsys):
    from safetensors.numpy import load_file

    rc = main(["quantize", "--model", "mymodels:build", "--calib-data", "calib.pt", "--config", "cfg.json",
               "--bias-correction", "--out", "bc", "--no-progress"])
    assert rc == 0, capsys.readouterr().out
    tensors = load_file(str(project / "bc" / "quant_params.safetensors"))
    assert any(k.endswith(".bias_correction") for k in tensors)


@pytest.mark.parametrize("argv, flag", [
    (["--w-bit", "4", "--export", "onnx"], "--export"),
    (["--export", "w8a8", "--config", "wo.json"], "--export"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_cli_refuses_before_calibrating(project, argv, flag, capsys):
    (project / "wo.json").write_text(json.dumps({"quant_mode": 1, "act_quant": False}))
    rc = main(["quantize", "--model", "mymodels:build", "--calib-data", "calib.pt", "--out", "out", "--no-progress",
               "--quant-mode", "1", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and flag in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (project / "out").exists()  # nothing calibrated, nothing written


@pytest.mark.parametrize("argv, file_text, flag", [
    (["--config", "bad.json"], "{quant_mode: 1", "--config"),
    (["--input-shape", "1,x"], None, "--input-shape"),
    (["--calib-data", "data.txt"], "1 2 3", "--calib-data"),
    (["--calib-data", "data.PT"], "not a pickle", "--calib-data"),
])
def test_cli_errors_name_the_flag(project, argv, file_text, flag, capsys):
    if file_text is not None:
        (project / argv[1]).write_text(file_text)
    base = ["quantize", "--model", "mymodels:build", "--out", "out", "--no-progress"]
    if "--calib-data" not in argv:
        base += ["--calib-data", "calib.pt"]
    rc = main(base + argv)
    err = capsys.readouterr().err
    assert rc == 2 and flag in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
