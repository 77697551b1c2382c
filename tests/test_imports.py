"""A default calibration imports only what it uses (a fresh process pays for every import)."""

import subprocess
import sys

SCRIPT = """
import sys, torch, jaxq
from bridge import Calibrator
from bridge.models.digits import load_digits_cnn
Calibrator(load_digits_cnn(), jaxq.QuantConfig(), [torch.randn(8, 1, 8, 8) for _ in range(2)], progress=False).run()
print(" ".join(m for m in ("optax", "flax", "torchax", "onnx", "transformers", "pandas") if m in sys.modules))
"""


def test_a_default_run_imports_no_learning_lowering_or_export_package():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1:] in ([], [""])
