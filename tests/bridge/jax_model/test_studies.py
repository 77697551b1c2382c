import numpy as np
import torch

import jaxq
from bridge.studies import sensitivity as sens
from bridge.capture.data import Batch
from bridge.jax_model import isolated_sensitivity
from bridge.jax_model.collate import merge_batches


def test_isolated_sensitivity_matches_the_torch_loop_and_compiles_once(digits_w8a8):
    cal, _ = digits_w8a8
    batches = cal.calibration_batches(64)
    loop = sens.isolated_sensitivity(cal.model, cal.quantizers, batches)
    qf = cal.jax_forward()
    vec = isolated_sensitivity(qf, batches)
    names = list(loop)
    a, b = np.array([loop[n] for n in names]), np.array([vec[n] for n in names])
    assert list(np.argsort(-a)) == list(np.argsort(-b))
    np.testing.assert_allclose(b, a, rtol=0.05)
    with jaxq.compile_count() as c:
        again = isolated_sensitivity(qf, batches)
    assert c.count == 0 and again == vec


def test_layer_groups_give_the_same_values(digits_w8a8):
    from bridge.jax_model.studies import layer_groups

    cal, _ = digits_w8a8
    batches = cal.calibration_batches(32)
    qf = cal.jax_forward()
    one = isolated_sensitivity(qf, batches, groups=1)
    each = isolated_sensitivity(qf, batches, groups=len(qf.layers))
    two = isolated_sensitivity(qf, batches, groups=2)
    for other in (each, two):
        np.testing.assert_allclose([other[n] for n in one], [one[n] for n in one], rtol=1e-4, atol=1e-7)
    assert layer_groups(48, 8) == [(0, 6), (6, 12), (12, 18), (18, 24), (24, 30), (30, 36), (36, 42), (42, 48)]
    assert layer_groups(23, 8) == [(0, 3), (3, 6), (6, 9), (9, 12), (12, 15), (15, 18), (18, 21), (21, 23)]
    assert layer_groups(3, 8) == [(0, 1), (1, 2), (2, 3)]


def test_calibrator_sensitivity_engine_jax_gives_the_same_ranking(digits_w8a8):
    cal, _ = digits_w8a8
    torch_table = cal.sensitivity(metrics=("isolated",), samples=32)
    jax_table = cal.sensitivity(metrics=("isolated",), samples=32, engine="jax")
    assert torch_table.ranked("isolated") == jax_table.ranked("isolated")


def test_token_batches_are_padded_into_one_with_a_mask():
    a = Batch((), {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)})
    b = Batch((), {"input_ids": torch.tensor([[8, 9]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)})
    c = Batch((), {"input_ids": torch.arange(1, 21)[None], "attention_mask": torch.ones(1, 20, dtype=torch.long)})
    short, long = merge_batches([a, c, b])
    assert short.batch.kwargs["input_ids"].shape == (2, 16) and long.batch.kwargs["input_ids"].shape == (1, 32)
    assert short.batch.kwargs["input_ids"][:, :4].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0]]
    assert short.token_mask[:, :4].tolist() == [[True, True, True, False], [True, True, False, False]]


def test_image_batches_of_equal_shape_are_concatenated_others_kept_apart():
    xs = [
        Batch((torch.zeros(2, 3, 8, 8),), {}),
        Batch((torch.ones(3, 3, 8, 8),), {}),
        Batch((torch.ones(1, 3, 4, 4),), {}),
    ]
    merged = merge_batches(xs)
    assert [m.batch.args[0].shape[0] for m in merged] == [5, 1]


def test_every_sample_weighs_the_same_whatever_its_batch(digits_w8a8):
    """Ten samples as batches of 8 + 2 or as one batch of 10: the same distances, on the
    torch loop and on the JAX program (a per-batch mean would weigh the last two 4× each)."""
    cal, _ = digits_w8a8
    (whole,) = [Batch((torch.cat([b.args[0] for b in cal.calibration_batches(64)])[:10],), {})]
    split = [Batch((whole.args[0][:8],), {}), Batch((whole.args[0][8:],), {})]
    layers, qf = cal.quantizers, cal.jax_forward()
    names = list(layers)
    for study in (lambda b: sens.isolated_sensitivity(cal.model, layers, b), lambda b: isolated_sensitivity(qf, b)):
        one, two = study([whole]), study(split)
        np.testing.assert_allclose([two[n] for n in names], [one[n] for n in names], rtol=1e-4, atol=1e-8)
    per_batch_mean = np.mean([sens.isolated_sensitivity(cal.model, layers, [b])[names[0]] for b in split])
    assert abs(per_batch_mean - one[names[0]]) > 1e-3 * one[names[0]]  # the split does tell the two apart
