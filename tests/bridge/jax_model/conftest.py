import importlib.util

import pytest

# without the jax extra (pip install -e '.[jax]') these tests are not collected; torchax is
# not imported here (it imports only through bridge.jax_model.compat)
if importlib.util.find_spec("torchax") is None or importlib.util.find_spec("flax") is None:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="module")
def digits_w8a8():
    """A calibrated digits CNN (W8A8 min-max, msModelSlim arithmetic: no bias correction) and its
    calibration batches."""
    import jaxq
    from bridge import Calibrator
    from bridge.evaluation import protocols

    p = protocols.digits()
    cal = Calibrator(
        p.make_model(), jaxq.QuantConfig(w_bit=8, a_bit=8, bias_correction=False), p.calib_data, progress=False
    ).run()
    return cal, p


def _data_dependent_class():
    from torch import nn

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            return y if y.sum() > 0 else -y

    return DataDependent


@pytest.fixture
def data_dependent_model():
    """A model torchax cannot lower: Python control flow on a tensor's value."""
    import torch

    torch.manual_seed(0)
    return _data_dependent_class()().eval()


@pytest.fixture
def data_dependent_blocks():
    """Three such modules in a `Sequential`: blocks that cannot be lowered."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    cls = _data_dependent_class()
    return nn.Sequential(cls(), cls(), cls()).eval()
