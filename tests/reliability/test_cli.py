"""Reliability: the CLI refuses bad input before calibrating, in one line naming the flag or file."""
import json

import pytest

from bridge.cli import main


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
