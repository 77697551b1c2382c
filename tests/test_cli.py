import pytest
import subprocess
import sys

from bridge.cli.main import main


def test_demo_prints_accuracies_and_writes_params(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "FP32 test accuracy       99.33%" in out
    assert "quantized test accuracy" in out and str(tmp_path / "p") in out
    assert (tmp_path / "p" / "quant_params.safetensors").exists()


def test_demo_bad_option_is_a_clean_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--w-bit", "1", "--no-progress"]) == 2
    assert "w_bit=1" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_is_installed():
    r = subprocess.run([sys.executable, "-m", "bridge.cli.main", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout
