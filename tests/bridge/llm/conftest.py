import pytest
import torch

pytest.importorskip("transformers")


@pytest.fixture
def llama(make_llama):
    return make_llama()


@pytest.fixture
def tokens():
    return torch.randint(0, 64, (12, 32), generator=torch.Generator().manual_seed(0))
