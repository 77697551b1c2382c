"""Reliability: the CLI refuses bad input before calibrating, in one line naming the flag or file."""

import json

import pytest

from bridge.cli.main import main


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--w-bit", "4", "--export", "onnx"], "--export"),
        (["--export", "w8a8", "--config", "wo.json"], "--export"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_cli_refuses_before_calibrating(project, argv, flag, capsys):
    (project / "wo.json").write_text(json.dumps({"quant_mode": 1, "act_quant": False}))
    rc = main(
        [
            "quantize",
            "--model",
            "mymodels:build",
            "--calib-data",
            "calib.pt",
            "--out",
            "out",
            "--no-progress",
            "--quant-mode",
            "1",
            *argv,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and flag in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (project / "out").exists()  # nothing calibrated, nothing written


@pytest.mark.parametrize(
    "argv, file_text, flag",
    [
        (["--config", "bad.json"], "{quant_mode: 1", "--config"),
        (["--input-shape", "1,x"], None, "--input-shape"),
        (["--calib-data", "data.txt"], "1 2 3", "--calib-data"),
        (["--calib-data", "data.PT"], "not a pickle", "--calib-data"),
    ],
)
def test_cli_errors_name_the_flag(project, argv, file_text, flag, capsys):
    if file_text is not None:
        (project / argv[1]).write_text(file_text)
    base = ["quantize", "--model", "mymodels:build", "--out", "out", "--no-progress"]
    if "--calib-data" not in argv:
        base += ["--calib-data", "calib.pt"]
    rc = main(base + argv)
    err = capsys.readouterr().err
    assert rc == 2 and flag in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("jaxq ")


def test_cli_demo_refuses_negative_samples(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--calib-samples", "-3"])
    assert "--calib-samples" in capsys.readouterr().err


def test_cli_model_as_a_path(project, capsys):
    rc = main(
        [
            "quantize",
            "--model",
            "./mymodels.py:build",
            "--calib-data",
            "calib.pt",
            "--out",
            "out",
            "--no-progress",
            "--quant-mode",
            "1",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert (project / "out" / "quant_params.json").exists()


def test_cli_smooth_quant_with_w8a8_is_refused_before_calibrating(project, capsys):
    (project / "sq.json").write_text(json.dumps({"quant_mode": 1, "smooth_quant": 0.5}))
    rc = main(
        [
            "quantize",
            "--model",
            "mymodels:build",
            "--calib-data",
            "calib.pt",
            "--out",
            "out",
            "--no-progress",
            "--config",
            "sq.json",
            "--export",
            "w8a8",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--export" in err and "SmoothQuant" in err and not (project / "out").exists()


@pytest.mark.parametrize("name", ["calib.npy", "calib.safetensors"])
def test_cli_corrupt_calib_file_is_named(project, name, capsys):
    (project / name).write_bytes(b"\x00\x01garbage")
    rc = main(
        [
            "quantize",
            "--model",
            "mymodels:build",
            "--calib-data",
            name,
            "--out",
            "out",
            "--no-progress",
            "--quant-mode",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and name in err and "--calib-data" in err
