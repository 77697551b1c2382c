import copy

import torch
from torch import nn

from bridge.capture.data import Batch
from bridge.inplace.fuse import find_conv_bn_pairs, fuse_conv_bn


def _trained_bn(bn):
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


class Branchy(nn.Module):
    """conv1's output feeds a BN *and* a residual add: folding would change the result."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = _trained_bn(nn.BatchNorm2d(3))

    def forward(self, x):
        y = self.conv1(x)
        return self.bn1(y) + y


def test_fusion_preserves_outputs_and_removes_bn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        _trained_bn(nn.BatchNorm2d(8)),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        _trained_bn(nn.BatchNorm2d(4)),
    ).eval()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        ref = model(x)
    pairs = [f.pair for f in fuse_conv_bn(model, Batch((x,), {}))]
    assert pairs == [("0", "1"), ("3", "4")]
    assert isinstance(model[1], nn.Identity) and model[0].bias is not None
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_conv_output_used_twice_is_left_alone():
    torch.manual_seed(0)
    model = Branchy().eval()
    x = torch.randn(1, 3, 6, 6)
    before = copy.deepcopy(model.state_dict())
    assert find_conv_bn_pairs(model, Batch((x,), {}))[0] == [("conv1", "bn1")]
    assert fuse_conv_bn(model, Batch((x,), {})) == []  # parity check rejects it
    assert isinstance(model.bn1, nn.BatchNorm2d) and model.conv1.bias is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_training_mode_models_are_not_fused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    assert fuse_conv_bn(model, Batch((torch.randn(2, 3, 5, 5),), {})) == []
