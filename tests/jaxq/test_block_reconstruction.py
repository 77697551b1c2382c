import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxq import block_reconstruction as br
from jaxq.calibrate import quantize_weight
from jaxq.scheme import QScheme


def _setup(seed=0, out=6, d=10, bits=4):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(out, d)).astype(np.float32)
    scheme = QScheme(bits=bits, signed=True, symmetric=True, axis=0)
    qw = quantize_weight(jnp.asarray(w), scheme)
    return w, qw, scheme


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 4, 8]))
def test_initial_soft_weight_is_the_float_weight_inside_the_grid(seed, bits):
    w, qw, scheme = _setup(seed, bits=bits)
    sw, v0 = br.soft_weight_init(w, qw.qparams.scale, qw.qparams.offset, scheme.qmin, scheme.qmax)
    soft = np.asarray(br.soft_weight(sw, v0))
    s = np.asarray(qw.qparams.scale)[:, None]
    inside = (w / s > scheme.qmin) & (w / s < scheme.qmax - 1)
    np.testing.assert_allclose(soft[inside], w[inside], atol=2e-4 * np.broadcast_to(s, w.shape)[inside].max())


def test_hard_codes_round_h_at_one_half_and_match_the_hard_weight():
    w, qw, scheme = _setup(1)
    sw, v0 = br.soft_weight_init(w, qw.qparams.scale, qw.qparams.offset, scheme.qmin, scheme.qmax)
    codes = np.asarray(br.hard_codes(sw, v0))
    np.testing.assert_array_equal(codes, np.asarray(qw.q))  # h(V₀) = fractional part → round to nearest
    hard = np.asarray(br.soft_weight(sw, v0, hard=True))
    np.testing.assert_allclose(
        hard, (codes - np.asarray(qw.qparams.offset)[:, None]) * np.asarray(qw.qparams.scale)[:, None], rtol=1e-6
    )


def test_rounding_reg_is_zero_only_at_hard_values_and_beta_anneals():
    assert float(br.rounding_reg(jnp.array([1e4, -1e4]), 2.0)) == 0.0
    assert float(br.rounding_reg(jnp.array([0.0]), 2.0)) > 0.9
    p = br.ReconParams(steps=100, schedule=br.RoundingSchedule(warmup=0.2))
    beta = lambda step: float(br.beta_schedule(step, p.steps, p.schedule))  # noqa: E731
    assert beta(0) == 20.0 and beta(20) == 20.0 and beta(100) == 2.0


def test_optimise_lowers_the_output_error_of_a_two_layer_block():
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(4, 16)).astype(np.float32) / 4
    x = jnp.asarray(rng.normal(size=(64, 8)).astype(np.float32))
    target = jax.nn.relu(x @ w1.T) @ w2.T
    scheme = QScheme(bits=3, signed=True, symmetric=True, axis=0)
    soft, v0 = {}, {}
    for k, w in (("a", w1), ("b", w2)):
        qw = quantize_weight(jnp.asarray(w), scheme)
        soft[k], v0[k] = br.soft_weight_init(w, qw.qparams.scale, qw.qparams.offset, scheme.qmin, scheme.qmax)

    def apply(lv, inputs, key):
        h = jax.nn.relu(inputs @ br.soft_weight(soft["a"], lv.v["a"]).T)
        if key is not None:  # QDrop-style: the hidden activation half the time on a coarse grid
            h = jnp.where(jax.random.bernoulli(key, 0.5, h.shape), jnp.round(h * 4) / 4, h)
        return h @ br.soft_weight(soft["b"], lv.v["b"]).T

    learned = br.Learned(v0, {"a": jnp.float32(0.0)})
    for keep in (1.0, 0.5):
        p = br.ReconParams(steps=300, batch=32, keep=keep)
        out, e = jax.jit(lambda lv, x, y, k: br.optimise(apply, lv, x, y, k, p))(
            learned, x, target, jax.random.PRNGKey(0)
        )
        assert float(e.fitted_after) < 0.8 * float(e.fitted_before)
        for k in ("a", "b"):
            h = np.asarray(jax.nn.sigmoid(out.v[k]) * 1.2 - 0.1)
            assert np.mean((h < 0.01) | (h > 0.99)) > 0.3  # the regulariser pushes h to 0 or 1 (from ~2 % at V₀)


@settings(max_examples=15, deadline=None)
@given(
    images=st.integers(1, 40),
    copies=st.integers(0, 3),
    extra=st.integers(0, 9),
    share=st.sampled_from([0.0, 0.1, 0.25, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_the_held_out_images_and_all_their_copies_never_meet_the_fitted_part(images, copies, extra, share, seed):
    n = images * (1 + copies) + extra  # images, their augmented copies, then synthetic samples
    key = jax.random.PRNGKey(seed)
    split = br.holdout_split(key, n, images, share, extra)
    fit, held = np.asarray(split.fit), np.asarray(split.held)
    held_n, fit_n = br.holdout_sizes(n, images, share, extra)
    assert len(held) == held_n and len(fit) == fit_n
    if share > 0 and images >= 2:
        assert 1 <= len(held) <= min(images - 1, br.MOST_HELD)
    else:
        assert len(held) == 0
    assert set(held) <= set(range(images))  # held-out samples are images, not copies or synthetic
    pooled = fit[fit < n - extra]
    assert not set(pooled % images) & set(held)  # no sample of a held-out image (nor a copy) is fitted
    assert set(range(n - extra, n)) <= set(fit)  # synthetic samples are always fitted
    assert set(fit) | {h + k * images for h in held for k in range(1 + copies)} == set(range(n))
    again = br.holdout_split(key, n, images, share, extra)
    np.testing.assert_array_equal(np.asarray(again.fit), fit)  # deterministic for the key
    np.testing.assert_array_equal(np.asarray(again.held), held)


def test_holdout_split_refuses_a_pool_that_is_not_whole_copies():
    with pytest.raises(ValueError, match="not whole copies of 4 images"):
        br.holdout_split(jax.random.PRNGKey(0), 10, 4, 0.25)


def _two_layer_problem(seed=0, n=64, bits=3):
    rng = np.random.default_rng(seed)
    w1, w2 = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(4, 16)).astype(np.float32) / 4
    x = jnp.asarray(rng.normal(size=(n, 8)).astype(np.float32))
    target = jax.nn.relu(x @ w1.T) @ w2.T
    scheme = QScheme(bits=bits, signed=True, symmetric=True, axis=0)
    soft, v0 = {}, {}
    for k, w in (("a", w1), ("b", w2)):
        qw = quantize_weight(jnp.asarray(w), scheme)
        soft[k], v0[k] = br.soft_weight_init(w, qw.qparams.scale, qw.qparams.offset, scheme.qmin, scheme.qmax)

    def apply(lv, inputs, key):
        return jax.nn.relu(inputs @ br.soft_weight(soft["a"], lv.v["a"]).T) @ br.soft_weight(soft["b"], lv.v["b"]).T

    return apply, br.Learned(v0, {"a": jnp.float32(0.0)}), x, target


def test_with_a_split_the_kept_state_is_the_checkpoint_of_lowest_held_out_error():
    apply, learned, x, target = _two_layer_problem()
    split = br.holdout_split(jax.random.PRNGKey(1), 64, 16, 0.25)
    p = br.ReconParams(steps=200, batch=16, checks=4)
    run = jax.jit(lambda lv, x, y, k, s: br.optimise(apply, lv, x, y, k, p, split=s))
    kept, e = run(learned, x, target, jax.random.PRNGKey(0), split)
    assert int(e.kept_step) in (0, 50, 100, 150, 200)
    assert float(e.held_after) <= float(e.held_before)
    held = np.asarray(split.held)
    hard = br.Learned({k: jnp.where(br.rectified_sigmoid(v) >= 0.5, 1e4, -1e4) for k, v in kept.v.items()}, kept.u)
    recomputed = br.output_error(apply(hard, x[held], None), target[held])
    np.testing.assert_allclose(float(e.held_after), float(recomputed), rtol=1e-5)
    _, e_all = run(learned, x, target, jax.random.PRNGKey(0), None)
    assert int(e_all.kept_step) == 200 and np.isnan(float(e_all.held_after))  # no split: the final state


@pytest.mark.parametrize("masked", [False, True])
def test_the_reported_errors_are_over_every_sample_whatever_the_batch(masked):
    """The errors are measured `batch` samples at a time (memory); a last part shorter than
    the batch counts its samples once, and a mask's positions are weighed as in one pass."""
    apply, learned, x, target = _two_layer_problem(n=21)
    x3, y3 = x.reshape(21, 1, 8) * jnp.ones((1, 3, 1)), target.reshape(21, 1, 4) * jnp.arange(1.0, 4.0)[None, :, None]
    mask = jnp.asarray(np.random.default_rng(0).random((21, 3)) < 0.6) if masked else None
    apply3 = lambda lv, inputs, key: apply(lv, inputs.reshape(-1, 8), key).reshape(-1, 3, 4)  # noqa: E731
    p = br.ReconParams(steps=0, batch=8)  # 21 samples: parts of 8, 8 and 5
    _, e = jax.jit(lambda lv, x, y, k, m: br.optimise(apply3, lv, x, y, k, p, m))(
        learned, x3, y3, jax.random.PRNGKey(0), mask
    )
    whole = br.output_error(apply3(br._hardened(learned), x3, None), y3, mask)
    np.testing.assert_allclose(float(e.fitted_before), float(whole), rtol=1e-6)
    np.testing.assert_allclose(float(e.fitted_after), float(whole), rtol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_micro_batches_give_the_whole_batch_step(masked):
    """A mini-batch's gradient summed over micro-batches is the whole batch's (the loss of
    `optimise`, mask and regulariser included): the learned state is the same."""
    apply, learned, x, target = _two_layer_problem(n=48)
    x3, y3 = x.reshape(48, 1, 8) * jnp.ones((1, 3, 1)), target.reshape(48, 1, 4) * jnp.arange(1.0, 4.0)[None, :, None]
    mask = jnp.asarray(np.random.default_rng(1).random((48, 3)) < 0.6) if masked else None
    apply3 = lambda lv, inputs, key: apply(lv, inputs.reshape(-1, 8), key).reshape(-1, 3, 4)  # noqa: E731
    out = {}
    for micro in (0, 4, 5):  # 5: the largest divisor of 16 below it, 4
        p = br.ReconParams(steps=60, batch=16, micro_batch=micro, schedule=br.RoundingSchedule(reg=1.0, warmup=0.0))
        out[micro], _ = jax.jit(lambda lv, x, y, k, m, p=p: br.optimise(apply3, lv, x, y, k, p, m))(
            learned, x3, y3, jax.random.PRNGKey(0), mask
        )
    moved = np.abs(np.asarray(out[0].v["a"]) - np.asarray(learned.v["a"])).max()
    assert moved > 0.1  # the steps learned something
    for micro in (4, 5):
        for k in ("a", "b"):
            np.testing.assert_allclose(np.asarray(out[micro].v[k]), np.asarray(out[0].v[k]), rtol=1e-4, atol=1e-4)
    assert br.micro_batch_size(16, 5) == 4 and br.micro_batch_size(16, 0) == 16 and br.micro_batch_size(12, 7) == 6


def test_the_fit_with_a_split_is_the_fit_on_the_fitted_samples_alone():
    """Mini-batches come from the fitted part only: the run equals one on those samples."""
    apply, learned, x, target = _two_layer_problem()
    split = br.holdout_split(jax.random.PRNGKey(1), 64, 16, 0.25)
    p = br.ReconParams(steps=150, batch=16, checks=1)
    with_split, e = jax.jit(lambda lv, x, y, k, s: br.optimise(apply, lv, x, y, k, p, split=s))(
        learned, x, target, jax.random.PRNGKey(0), split
    )
    fit = np.asarray(split.fit)
    alone, _ = jax.jit(lambda lv, x, y, k: br.optimise(apply, lv, x, y, k, p))(
        learned, x[fit], target[fit], jax.random.PRNGKey(0)
    )
    assert int(e.kept_step) == 150  # the final state was better on the held-out images than the start
    for k in ("a", "b"):
        np.testing.assert_allclose(np.asarray(with_split.v[k]), np.asarray(alone.v[k]), rtol=1e-6, atol=1e-6)


def test_the_regulariser_makes_rounding_hard_and_the_report_counts_it():
    """`hard_share` is the share of `h(V)` exactly 0 or 1; with the annealed regulariser the
    variables end hard, without it they stay soft (so this test fails if rounding stays soft)."""
    apply, learned, x, target = _two_layer_problem()

    def run(reg):
        p = br.ReconParams(steps=300, batch=16, lr_rounding=3e-2, schedule=br.RoundingSchedule(reg=reg))
        return jax.jit(lambda lv, x, y, k: br.optimise(apply, lv, x, y, k, p))(
            learned, x, target, jax.random.PRNGKey(0)
        )

    kept, e = run(1.0)
    h = np.concatenate([np.asarray(br.rectified_sigmoid(v)).ravel() for v in kept.v.values()])
    np.testing.assert_allclose(float(e.hard_share), np.mean((h == 0) | (h == 1)), rtol=1e-6)
    assert float(e.hard_share) > 0.9
    _, soft = run(0.0)
    assert float(soft.hard_share) < 0.6


def test_the_rounding_learning_rate_decides_whether_the_default_steps_end_hard():
    """Adam moves each `V` by about `lr_rounding` per step and `h(V)` is hard only beyond
    |V| ≈ 2.4: over the default 300 steps, 0.01 (the default before) leaves about half soft,
    0.2 hardens most of it and fits the block better (the codes written are the ones fitted)."""
    apply, learned, x, target = _two_layer_problem()

    def run(lr):
        p = br.ReconParams(lr_rounding=lr)
        return jax.jit(lambda lv, x, y, k: br.optimise(apply, lv, x, y, k, p))(
            learned, x, target, jax.random.PRNGKey(0)
        )[1]

    slow, fast = run(0.01), run(0.2)
    assert float(slow.hard_share) < 0.6 < 0.8 < float(fast.hard_share)
    assert float(fast.fitted_after) < 0.75 * float(slow.fitted_after)


def test_the_normalised_loss_does_not_depend_on_the_block_output_scale():
    """`reg_per_variable > 0`: the block's error over its round-to-nearest error, the
    regulariser per variable — a block whose outputs are 64× larger (errors 4096×, exact in
    float) learns exactly the same codes. The papers' unnormalised loss does not: there the
    larger errors swamp the regulariser and less of the rounding ends hard."""
    apply, learned, x, target = _two_layer_problem()
    big = lambda lv, inputs, key: 64.0 * apply(lv, inputs, key)  # noqa: E731

    def run(fn, y, reg_per_variable):
        p = br.ReconParams(reg_per_variable=reg_per_variable)
        kept, e = jax.jit(lambda lv, x, y, k: br.optimise(fn, lv, x, y, k, p))(learned, x, y, jax.random.PRNGKey(0))
        return [np.asarray(br.rectified_sigmoid(v)) >= 0.5 for v in kept.v.values()], e

    codes, e = run(apply, target, 100.0)
    codes_big, e_big = run(big, 64.0 * target, 100.0)
    assert all(np.array_equal(a, b) for a, b in zip(codes, codes_big))
    assert float(e_big.hard_share) == float(e.hard_share) > 0.9
    np.testing.assert_allclose(float(e_big.fitted_after), 4096 * float(e.fitted_after), rtol=1e-6)
    _, plain = run(apply, target, 0.0)
    _, plain_big = run(big, 64.0 * target, 0.0)
    assert float(plain_big.hard_share) < float(plain.hard_share) - 0.1


def test_loss_weights_are_one_unnormalised_and_scale_free_normalised():
    p = br.ReconParams()
    assert tuple(map(float, br.loss_weights(p, jnp.float32(8.0), 1000))) == (1.0, 1.0)
    a, b = br.loss_weights(p._replace(reg_per_variable=50.0), jnp.float32(8.0), 1000)
    np.testing.assert_allclose([float(a), float(b)], [1 / 8, 50.0 / (p.schedule.reg * 1000)], rtol=1e-6)
    assert np.isfinite(float(br.loss_weights(p._replace(reg_per_variable=1.0), jnp.float32(0.0), 10)[0]))
    off = p._replace(reg_per_variable=1.0, schedule=br.RoundingSchedule(reg=0.0))
    assert float(br.loss_weights(off, jnp.float32(8.0), 10)[1]) == 0.0


def test_the_hard_final_steps_hold_the_rounding_hard_and_learn_only_the_step_sizes():
    """`hard_final`: the first steps are the soft run of that length (the regulariser's
    schedule over them), then every `V` stays at its hard rounding — the codes are that
    run's, every variable is hard (even with no regulariser) — and the step sizes learn on."""
    apply, learned, x, target = _two_layer_problem()
    learned = learned._replace(u={"a": jnp.float32(0.0)})

    def apply_scaled(lv, inputs, key):  # a learned step size that the loss depends on
        return apply(lv, inputs * jnp.exp(lv.u["a"]), key)

    def run(steps, hard_final, reg=0.01):
        p = br.ReconParams(steps=steps, batch=16, hard_final=hard_final, schedule=br.RoundingSchedule(reg=reg))
        return jax.jit(lambda lv, x, y, k: br.optimise(apply_scaled, lv, x, y, k, p))(
            learned, x, target, jax.random.PRNGKey(0)
        )

    assert br.soft_steps(br.ReconParams(steps=200, hard_final=0.2)) == 160
    soft_only, _ = run(160, 0.0)
    kept, e = run(200, 0.2)
    for k in ("a", "b"):
        want = np.asarray(br.rectified_sigmoid(soft_only.v[k])) >= 0.5
        np.testing.assert_array_equal(np.asarray(br.rectified_sigmoid(kept.v[k])) >= 0.5, want)
    assert float(e.hard_share) == 1.0
    assert float(kept.u["a"]) != float(soft_only.u["a"])  # the step size learned on
    _, unregularised = run(200, 0.2, reg=0.0)
    assert float(unregularised.hard_share) == 1.0


@settings(max_examples=20, deadline=None)
@given(keep=st.floats(0.05, 0.95), seed=st.integers(0, 2**31 - 1))
def test_keep_mask_keeps_each_element_with_probability_keep_and_is_fixed_by_its_key(keep, seed):
    key = jax.random.PRNGKey(seed)
    mask = np.asarray(br.keep_mask(key, keep, (64, 3, 32, 32)))
    assert mask.dtype == bool and mask.shape == (64, 3, 32, 32)
    assert abs(mask.mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / mask.size)
    np.testing.assert_array_equal(mask, np.asarray(jax.jit(br.keep_mask, static_argnums=(1, 2))(key, keep, mask.shape)))
    other = np.asarray(br.keep_mask(jax.random.fold_in(key, 1), keep, mask.shape))
    assert (other != mask).mean() > 0.5 * 2 * keep * (1 - keep)  # a new key draws anew: ~2p(1-p) differ


def test_keep_mask_draws_are_uncorrelated_between_neighbours_and_exact_at_the_ends():
    flat = np.asarray(br.keep_mask(jax.random.PRNGKey(0), 0.5, (256, 256))).astype(np.float64)
    for a, b in ((flat[:, :-1], flat[:, 1:]), (flat[:-1], flat[1:])):  # along rows and along columns
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.02
    assert np.asarray(br.keep_mask(jax.random.PRNGKey(0), 1.0, (1000,))).all()
    assert not np.asarray(br.keep_mask(jax.random.PRNGKey(0), 0.0, (1000,))).any()
