import pytest

from bridge.cli.main import main


@pytest.mark.parametrize("data", ["calib.pt", "calib.npy", "mymodels:data"])
def test_quantize_writes_chosen_exports(project, data, capsys):
    rc = main(
        [
            "quantize",
            "--model",
            "mymodels:build",
            "--calib-data",
            data,
            "--config",
            "cfg.json",
            "--quantize-all",
            "--export",
            "params",
            "w8a8",
            "--out",
            "out",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "quantized layers  5 of 5" in out and "act_method=2" in out
    for name in (
        "quant_params.safetensors",
        "quant_model_weight_w8a8.safetensors",
        "quant_model_description_w8a8.json",
    ):
        assert (project / "out" / name).is_file()


def test_quantize_flags_override_config(project, capsys):
    rc = main(
        [
            "quantize",
            "--model",
            "mymodels:build",
            "--calib-data",
            "calib.pt",
            "--config",
            "cfg.json",
            "--w-bit",
            "4",
            "--out",
            "o",
            "--no-progress",
        ]
    )
    assert rc == 0 and "W4A8" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "mymodels"], "module:function"),
        (["--model", "nosuch:build"], "cannot import"),
        (
            ["--model", "mymodels:not_a_model", "--calib-data", "calib.pt", "--config", "cfg.json"],
            "not a torch.nn.Module",
        ),
        (["--model", "mymodels:build", "--calib-data", "missing.pt"], "does not exist"),
        (["--model", "mymodels:build", "--config", "cfg.json", "--export", "pdf"], "not known"),
        (["--model", "mymodels:build", "--config", "cfg.json", "--w-bit", "1"], "w_bit=1"),
    ],
)
def test_quantize_errors(project, argv, message, capsys):
    assert main(["quantize", *argv, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, expected", [([], True), (["--bias-correction"], True), (["--no-bias-correction"], False)]
)
def test_quantize_bias_correction_flag_reaches_the_params(project, capsys, flag, expected):
    """On by default with real calibration data; --no-bias-correction is msModelSlim's arithmetic."""
    from safetensors.numpy import load_file

    rc = main(
        [
            "quantize",
            "--model",
            "mymodels:build",
            "--calib-data",
            "calib.pt",
            "--config",
            "cfg.json",
            *flag,
            "--out",
            "bc",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    tensors = load_file(str(project / "bc" / "quant_params.safetensors"))
    assert any(k.endswith(".bias_correction") for k in tensors) == expected
    assert ("bias_correction" in out.split("config", 1)[1].splitlines()[0]) == expected


def test_mixed_layer_bits_with_an_eight_bit_export_is_refused_before_calibrating():
    import jaxq
    from bridge.cli.quantize import CLIError, check_exports

    cfg = jaxq.QuantConfig(layer_bits={"features.*": 4})
    with pytest.raises(CLIError, match=r"layer_bits sets 'features\.\*': 4"):
        check_exports(["params", "w8a8"], cfg)
    check_exports(["params"], cfg)
