"""Reliability: models a new user brings — every quantizable weight and input is quantized
(checked against a reference fake-quant computation) and the output stays close to float."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bridge import Calibrator
from bridge.inplace.fakequant import model_quantizers
from jaxq import QuantConfig

W8A8 = QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True)


def _cosine(a, b):
    return float(F.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1)))


def _fq_input(q, x):
    s = q.act_scheme
    return torch.fake_quantize_per_tensor_affine(x, float(q.input_scale), int(q.input_offset), s.qmin, s.qmax)


def _fq_weight(q):
    s = q.weight_scheme
    return torch.fake_quantize_per_channel_affine(
        q.float_weight.detach(), q.weight_scale, q.weight_offset, 0, s.qmin, s.qmax
    )


def _calibrate(model, data, cfg=W8A8):
    with torch.no_grad():
        ref = [model(x) for x in data[-2:]]
    cal = Calibrator(model, cfg, data[:-2], progress=False).run()
    with torch.no_grad():
        out = [cal.model(x) for x in data[-2:]]
    return cal, ref, out


def _every_input_seen_quantized(cal, data):
    """The input of each quantized layer, as its quantizer receives it on one forward."""
    seen = {}
    for name, q in model_quantizers(cal.model).items():
        q.listeners.append(lambda x, name=name: seen.setdefault(name, x.detach().clone()))
    with torch.no_grad():
        cal.model(data[-1])
    for q in model_quantizers(cal.model).values():
        q.listeners.clear()
    return seen


def test_transformer_encoder_fast_path_is_quantized():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.TransformerEncoder(layer, 4, enable_nested_tensor=False), nn.Linear(32, 8)
    ).eval()
    data = [torch.randn(4, 10, 16) for _ in range(8)]
    cal, ref, out = _calibrate(model, data)
    names = set(cal.quantized_names)
    for i in range(4):  # attention's input projection and out_proj, both FFN linears of every layer
        assert {
            f"1.layers.{i}.self_attn",
            f"1.layers.{i}.self_attn.out_proj",
            f"1.layers.{i}.linear1",
            f"1.layers.{i}.linear2",
        } <= names
    seen = _every_input_seen_quantized(cal, data)
    assert set(seen) == names  # every quantized layer's input passed through its quantizer
    for r, o in zip(ref, out):
        assert not torch.equal(r, o) and _cosine(r, o) >= 0.99
    # switched off, the model is float again (torch's slow path instead of its fused one: ~1e-6)
    cal.disable_quant()
    with torch.no_grad():
        torch.testing.assert_close(cal.model(data[-1]), ref[-1], rtol=0, atol=1e-5)


def test_multihead_attention_matches_a_reference_fake_quant_computation():
    torch.manual_seed(1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.mha(x, x, x, need_weights=False)[0])

    model = Block().eval()
    data = [torch.randn(3, 5, 16) for _ in range(6)]
    cal, ref, out = _calibrate(model, data)
    layers = model_quantizers(cal.model)
    assert set(layers) == {"mha", "mha.out_proj", "head"}
    mha, out_proj, head = layers["mha"], layers["mha.out_proj"], layers["head"]
    x = data[-1]
    with torch.no_grad():  # the same computation written out with torch's fake-quant ops
        xq = _fq_input(mha, x)
        qkv = F.linear(
            xq,
            _fq_weight(mha),
            model.mha.parametrizations.in_proj_weight.original.new_tensor(0) * 0 + mha.module.in_proj_bias,
        )
        q, k, v = qkv.chunk(3, -1)
        split = lambda t: t.reshape(3, 5, 2, 8).transpose(1, 2)  # noqa: E731
        attn = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(3, 5, 16)
        y = F.linear(_fq_input(out_proj, attn), _fq_weight(out_proj), out_proj.module.bias)
        expected = F.linear(_fq_input(head, y), _fq_weight(head), head.module.bias)
        got = cal.model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert _cosine(out[-1], ref[-1]) >= 0.99


def test_vit_style_block_from_torch_nn():
    torch.manual_seed(2)

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 32, 4, stride=4)
            self.norm1 = nn.LayerNorm(32)
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.norm2 = nn.LayerNorm(32)
            self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
            self.head = nn.Linear(32, 10)

        def forward(self, img):
            x = self.patch(img).flatten(2).transpose(1, 2)
            h = self.norm1(x)
            x = x + self.attn(h, h, h)[0]
            x = x + self.mlp(self.norm2(x))
            return self.head(x.mean(1))

    model = ViT().eval()
    data = [torch.randn(4, 3, 16, 16) for _ in range(8)]
    cal, ref, out = _calibrate(model, data)
    assert set(cal.quantized_names) == {"patch", "attn", "attn.out_proj", "mlp.0", "mlp.2", "head"}
    assert set(_every_input_seen_quantized(cal, data)) == set(cal.quantized_names)
    for r, o in zip(ref, out):
        assert _cosine(r, o) >= 0.99


def test_conv_padding_same_and_valid():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding="same"),
        nn.ReLU(),
        nn.Conv2d(8, 8, 5, padding="same", dilation=2),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding="valid"),
        nn.Flatten(),
        nn.LazyLinear(5),
    ).eval()
    data = [torch.randn(2, 3, 12, 12) for _ in range(8)]
    with torch.no_grad():
        model(data[0])
    cfg = W8A8.replace(bias_correction=True, recon_rows=64)  # rows need the padding geometry
    cal, ref, out = _calibrate(model, data, cfg)
    assert set(cal.quantized_names) == {"0", "2", "4", "6"}
    for r, o in zip(ref, out):
        assert _cosine(r, o) >= 0.99


def test_weight_read_directly_and_keyword_input():
    torch.manual_seed(4)

    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            h = F.relu(F.linear(x, self.fc.weight, self.fc.bias))  # the module is never called
            return self.out(input=h)

    model = Direct().eval()
    data = [torch.randn(16, 8) for _ in range(6)]
    cal, ref, out = _calibrate(model, data)
    fc, head = model_quantizers(cal.model)["fc"], model_quantizers(cal.model)["out"]
    assert fc.functional and not head.functional
    x = data[-1]
    with torch.no_grad():
        h = F.relu(F.linear(_fq_input(fc, x), _fq_weight(fc), fc.module.bias))
        expected = F.linear(_fq_input(head, h), _fq_weight(head), head.module.bias)
        torch.testing.assert_close(cal.model(x), expected, rtol=0, atol=1e-6)


def test_module_under_two_names_and_called_twice():
    torch.manual_seed(5)
    shared = nn.Linear(6, 6)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = shared, shared, nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.b(torch.relu(self.a(x))))

    model = Twice().eval()
    data = [torch.randn(8, 6) for _ in range(6)]
    cal, ref, out = _calibrate(model, data)
    assert cal.quantized_names == ["a", "head"]  # one quantizer for the one module
    a, head = model_quantizers(cal.model)["a"], model_quantizers(cal.model)["head"]
    x = data[-1]
    with torch.no_grad():
        lin = lambda q, t: F.linear(_fq_input(q, t), _fq_weight(q), q.module.bias)  # noqa: E731
        expected = lin(head, lin(a, torch.relu(lin(a, x))))
        torch.testing.assert_close(cal.model(x), expected, rtol=0, atol=1e-6)
    table = cal.sensitivity(metrics=("mse",), samples=8)
    assert table.rows[0]["name"] == "a" and table.rows[0]["mse"] > 0


@pytest.mark.parametrize("layer", [nn.Conv3d(2, 2, 1), nn.ConvTranspose2d(2, 2, 1), nn.LSTM(2, 2)])
def test_unsupported_layers_are_named(layer):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.odd, self.fc = layer, nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x)

    with pytest.warns(UserWarning, match="odd"):
        cal = Calibrator(Net().eval(), W8A8, [torch.randn(3, 2)], progress=False)
    assert "odd" in cal.unsupported and "odd" in cal.summary() and "1 of 2" in cal.summary()


def test_disabled_layer_is_not_inspected():
    class Odd(nn.Conv2d):
        armed = False

        @property
        def padding(self):  # once armed, reading it fails: a disabled layer must not be inspected
            if Odd.armed:
                raise AssertionError("inspected")
            return self.__dict__["_pad"]

        @padding.setter
        def padding(self, v):
            self.__dict__["_pad"] = v

        def forward(self, x):
            return F.conv2d(x, self.weight, self.bias, 1, 1)

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Odd(4, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    data = [torch.randn(2, 3, 6, 6) for _ in range(3)]
    Odd.armed = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cal = Calibrator(model.eval(), W8A8.replace(disable_names=["2"]), data, progress=False).run()
    assert "2" not in cal.quantized_names


def test_default_keeps_every_output_head_float():
    class TwoHeads(nn.Module):  # a face detector: a probability head and a box head
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(3, 8, 3)
            self.mid = nn.Conv2d(8, 8, 1)
            self.prob = nn.Conv2d(8, 2, 1)
            self.box = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            h = torch.relu(self.mid(torch.relu(self.body(x))))
            return self.prob(h).softmax(1), self.box(h)

    cal = Calibrator(
        TwoHeads().eval(), QuantConfig(quant_mode=1, act_method=1), [torch.randn(2, 3, 8, 8)], progress=False
    )
    assert cal.disabled == {"body", "prob", "box"} and cal.quantized_names == ["mid"]


class ResidualStream(nn.Module):
    """A transformer's shape: blocks write into a residual stream through `out` layers, a
    norm ends it, and the model returns the stream and a head's output."""

    def __init__(self, d=8, blocks=3):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, d)
        self.inner = nn.ModuleList(nn.Linear(d, 2 * d) for _ in range(blocks))
        self.out = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(blocks))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.embed(x)
        for inner, out in zip(self.inner, self.out):
            h = h + out(torch.relu(inner(h)))
        h = self.norm(h)
        return h, self.head(h)


def test_default_keeps_the_head_float_but_quantizes_the_writers_of_a_residual_stream():
    """Every block's `out` reaches the model output through adds and the norm alone, but
    it feeds the next block (the last one feeds the head): none of them is a last layer."""
    cal = Calibrator(
        ResidualStream().eval(), QuantConfig(quant_mode=1, act_method=1), [torch.randn(4, 4)], progress=False
    )
    assert cal.disabled == {"embed", "head"}
    assert {"out.0", "out.1", "out.2", "inner.0"} <= set(cal.quantized_names)


def test_a_last_layer_read_by_no_layer_is_found_even_if_its_stream_feeds_others():
    class StreamOnly(ResidualStream):  # no head: the last block's writer is the last layer
        def forward(self, x):
            h = self.embed(x)
            for inner, out in zip(self.inner, self.out):
                h = h + out(torch.relu(inner(h)))
            return self.norm(h)

    model = StreamOnly().eval()
    del model.head
    cal = Calibrator(model, QuantConfig(quant_mode=1, act_method=1), [torch.randn(4, 4)], progress=False)
    assert cal.disabled == {"embed", "out.2"}


def test_the_first_layer_is_found_by_data_flow_not_by_module_order():
    class HeadFirst(nn.Module):  # defines its head before its stem
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 3)
            self.body = nn.Linear(8, 8)
            self.stem = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.head(torch.relu(self.body(self.stem(x).relu().mean((2, 3)))))

    cal = Calibrator(
        HeadFirst().eval(), QuantConfig(quant_mode=1, act_method=1), [torch.randn(2, 3, 8, 8)], progress=False
    )
    assert cal.disabled == {"stem", "head"} and cal.quantized_names == ["body"]
    summary = cal.summary()
    assert "stem: first layer: reads a model input" in summary and "head: last layer: no quantizable" in summary


class Attention(nn.Module):
    """Query, key and value read one normalised input; two branches meet before the head."""

    def __init__(self, d=8):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.side = nn.Linear(2, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x, extra):
        h = self.norm(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2), -1) @ self.v(h)
        return self.head(x + self.o(a) + self.side(extra))


def test_every_layer_reading_a_model_input_through_float_operations_is_first():
    """q, k and v read the model's input through a norm alone; `side` reads the second input."""
    data = [(torch.randn(2, 5, 8), torch.randn(2, 5, 2))]
    cal = Calibrator(Attention().eval(), QuantConfig(quant_mode=1, act_method=1), data, progress=False)
    assert cal.disabled == {"q", "k", "v", "side", "head"} and cal.quantized_names == ["o"]


def test_module_order_stands_in_where_the_forward_builds_no_graph():
    class NoGraph(Attention):
        def forward(self, x, extra):
            with torch.no_grad():
                return super().forward(x, extra)

    data = [(torch.randn(2, 5, 8), torch.randn(2, 5, 2))]
    cal = Calibrator(NoGraph().eval(), QuantConfig(quant_mode=1, act_method=1), data, progress=False)
    assert cal.disabled == {"q", "head"}
    assert "q: first or last layer in module order (the forward built no autograd graph)" in cal.summary()


def test_data_free_uniform_warns_about_input_range():
    from bridge.inplace.prepare import DataFreeRangeWarning

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with pytest.warns(DataFreeRangeWarning, match="bn_stats"):
        Calibrator(model, QuantConfig(quant_mode=0, input_shape=[2, 4], quantize_first_last=True), progress=False)


def test_bfloat16_model_with_bias_correction():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval().to(torch.bfloat16)
    data = [torch.randn(8, 16, dtype=torch.bfloat16) for _ in range(4)]
    cal = Calibrator(model, W8A8.replace(bias_correction=True, recon_rows=64), data, progress=False).run()
    assert all(r.bias_correction is not None for r in cal.records.values())
    with torch.no_grad():
        assert cal.model(data[0]).dtype == torch.bfloat16
