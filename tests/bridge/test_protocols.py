import pytest

from bridge.evaluation import protocols


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
