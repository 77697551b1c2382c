import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))  # deterministic numerics for metric thresholds


@pytest.fixture(scope="session")
def digits():
    from bridge.models.digits import digits_split

    return digits_split()


@pytest.fixture
def digits_model():
    from bridge.models.digits import load_digits_cnn

    return load_digits_cnn()


@pytest.fixture
def digits_calib(digits):
    x_train = digits[0]
    return [x_train[i:i + 32] for i in range(0, 128, 32)]
