import dataclasses

import pytest
import torch

from bridge.evaluation import protocols, zoo


def test_held_out_shrinks_the_evaluation_set_to_its_first_samples():
    from bridge.models.digits import accuracy, digits_split, load_digits_cnn

    _, _, x_test, y_test = digits_split()
    model = load_digits_cnn()
    assert protocols.digits(held_out=100).evaluate(model)["top1"] == accuracy(model, x_test[:100], y_test[:100])
    assert protocols.digits().evaluate(model)["top1"] == accuracy(model, x_test, y_test)


@pytest.mark.parametrize("bad", [0, -1, 451, 2.5, True, "32"])
def test_bad_held_out_names_the_field_and_the_range(bad):
    with pytest.raises(ValueError, match=r"held_out=.*\[1, 450\]"):
        protocols.digits(held_out=bad)


# -- calibration subsets: other draws, never the evaluated data


def test_minilm_subsets_are_fixed_per_seed_and_never_the_evaluated_passages():
    passages = zoo.text_passages()
    evaluated = set(passages[64 : protocols.MINILM_EVALUATED])
    assert protocols.minilm_calibration_passages(0) == passages[:64]
    draws = [protocols.minilm_calibration_passages(k) for k in (1, 2, 3)]
    for k, draw in zip((1, 2, 3), draws):
        assert len(draw) == 64 and not set(draw) & evaluated
        assert draw == protocols.minilm_calibration_passages(k)
    assert draws[0] != draws[1] != draws[2]


def _fake(name: str) -> protocols.Protocol:
    return protocols.Protocol(name, lambda: None, [torch.zeros(8, 3, 4, 4)] * 2, lambda m: {})


def test_image_subsets_are_crops_of_that_seed_in_batches_of_eight(monkeypatch):
    calls = []

    def crops(n, seed, size=224, which=None):
        calls.append((n, seed, which))
        return torch.full((n, 3, 2, 2), float(seed))

    monkeypatch.setattr(zoo, "image_crops", crops)
    batches = protocols.calibration_subset(_fake("efficientnet_lite0_unseen"), 3)
    assert [tuple(b.shape) for b in batches] == [(8, 3, 2, 2)] * 2 and calls == [(16, 3, zoo.CALIBRATION_PHOTOS)]
    assert protocols.calibration_subset(_fake("efficientnet_lite0"), 1)[0].shape[0] == 8


@pytest.mark.parametrize(
    ("name", "subset", "match"),
    [("efficientnet_lite0", 2, "evaluation set"), ("digits", 1, "no calibration subsets"), ("minilm", -1, "int ≥ 0")],
)
def test_subsets_that_would_be_wrong_are_refused(name, subset, match):
    with pytest.raises(ValueError, match=match):
        protocols.calibration_subset(_fake(name), subset)


def test_subset_zero_is_the_protocols_own_data():
    p = _fake("digits")
    assert protocols.calibration_subset(p, 0) is p.calib_data
    assert dataclasses.replace(p, calib_data=protocols.calibration_subset(p, 0)).calib_data is p.calib_data
