"""AdaRound: init reproduces nearest rounding, regulariser shape, METHOD.md schedule, alpha learns."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tcaq_jax import quant as Q


def _weights():
  rng = np.random.default_rng(0)
  w = (rng.normal(size=(32, 16)) * 0.1).astype(np.float32)
  s, z = Q.lp_search_params(w, 4, channel_axis=-1)
  return w, s, z


def test_hard_rounding_at_init_is_round_to_nearest():
  w, s, z = _weights()
  alpha = Q.init_alpha(w, s, z)
  hard = np.asarray(Q.adaround_fake_quant(w, alpha, s, z, 4, hard=True))
  s64, z64 = np.asarray(s, np.float64), np.asarray(z, np.float64)
  v = w / s64
  ref = (np.clip(np.floor(v + 0.5) + z64, 0, 15) - z64) * s64      # float64 round-to-nearest
  frac = v - np.floor(v)
  ok = np.abs(frac - 0.5) > 1e-4                                     # exclude float32 near-ties
  assert ok.mean() > 0.99
  np.testing.assert_allclose(hard[ok], ref[ok], rtol=1e-6, atol=1e-7)
  # Soft rounding at init reproduces w itself inside the range (h = residual).
  soft = np.asarray(Q.adaround_fake_quant(w, alpha, s, z, 4, hard=False))
  inside = (v + z64 >= 0) & (v + z64 <= 15)
  np.testing.assert_allclose(soft[inside], w[inside], rtol=1e-4, atol=1e-6)


def test_soft_rounding_formula():
  a = np.linspace(-8, 8, 101).astype(np.float32)
  ref = np.clip(1 / (1 + np.exp(-a.astype(np.float64))) * 1.2 - 0.1, 0, 1)
  np.testing.assert_allclose(np.asarray(Q.soft_rounding(a)), ref, atol=1e-6)


def test_saturated_host_and_device_agree_with_float64():
  from tcaq_jax.quant.adaround import saturated
  a = np.concatenate([np.linspace(-200, 200, 4001), [-1e30, 1e30]]).astype(np.float32)
  h64 = np.clip(1 / (1 + np.exp(-np.clip(a.astype(np.float64), -700, 700))) * 1.2 - 0.1, 0, 1)
  ref = ((h64 <= 0) | (h64 >= 1)).astype(np.float32)
  # away from the two clip points (sigmoid = 1/12 and 11/12) float32 and float64 agree exactly
  edge = np.abs(np.abs(a) - np.log(11.)) < 1e-3
  with np.errstate(all='raise'):                  # the host form must not overflow on huge alphas
    host = saturated(a, xp=np)
  np.testing.assert_array_equal(host[~edge], ref[~edge])
  np.testing.assert_array_equal(np.asarray(saturated(jnp.asarray(a)))[~edge], ref[~edge])
  assert 0 < ref.mean() < 1


def test_regularizer_zero_at_binary_and_max_at_half():
  for b in [2., 20.]:
    assert float(Q.rounding_regularizer(jnp.array([-10., 10., -30.]), b)) == 0.   # h exactly 0 or 1
    np.testing.assert_allclose(float(Q.rounding_regularizer(jnp.zeros(3), b)), 3.)   # h = 0.5 -> 1 each
    a = jnp.linspace(-6., 6., 241)
    per = jax.vmap(lambda x: Q.rounding_regularizer(x[None], b))(a)
    assert float(per[120]) == 1. and float(jnp.max(per)) <= 1.   # a[120] = 0 -> h = 0.5
    h = np.clip(1 / (1 + np.exp(-np.asarray(a, np.float64))) * 1.2 - 0.1, 0, 1)
    np.testing.assert_allclose(np.asarray(per), 1 - np.abs(2 * h - 1) ** b, atol=1e-5)


def test_b_schedule_matches_method():
  total = 20000
  steps = np.array([0, 1000, 3999, 4000, 8000, 12000, 19999, 20000])
  b, on = jax.vmap(lambda t: Q.b_schedule(t, total))(jnp.asarray(steps))
  start = 0.2 * total
  ref_b = np.where(steps < start, 20., 2. + 18. * np.maximum(0., 1. - (steps - start) / (total - start)))
  np.testing.assert_allclose(np.asarray(b), ref_b, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(on), (steps >= start).astype(np.float32))
  assert float(b[3]) == 20. and float(b[-1]) == 2.
  # No rounding loss during warmup; lambda * reg afterwards.
  alpha = jnp.zeros(5)
  assert float(Q.adaround_loss_reg(alpha, 100, total)) == 0.
  np.testing.assert_allclose(float(Q.adaround_loss_reg(alpha, total, total)), 0.01 * 5, rtol=1e-6)


def test_alpha_optimisation_reduces_output_error():
  rng = np.random.default_rng(1)
  w = (rng.normal(size=(16, 8)) * 0.2).astype(np.float32)
  # Correlated inputs (low-rank + noise): nearest rounding is not optimal for the layer output.
  x = (rng.normal(size=(256, 3)) @ rng.normal(size=(3, 16)) + 0.1 * rng.normal(size=(256, 16))).astype(np.float32)
  s, z = Q.minmax_params(w, 3, channel_axis=-1)
  st = Q.init_adaround_state(w, s, z, 3)
  y = x @ w
  total = 400

  def loss(alpha, step):
    w_hat = Q.adaround_fake_quant(w, alpha, st.scale, st.zero_point, 3)
    return jnp.mean((x @ w_hat - y) ** 2) + Q.adaround_loss_reg(alpha, step, total, lam=1e-3)

  opt = optax.adam(1e-2)

  @jax.jit
  def run(alpha):
    def body(carry, step):
      a, o = carry
      g = jax.grad(loss)(a, step)
      u, o = opt.update(g, o)
      return (optax.apply_updates(a, u), o), None
    (a, _), _ = jax.lax.scan(body, (alpha, opt.init(alpha)), jnp.arange(total))
    return a

  alpha = run(st.alpha)
  err = lambda hat: float(jnp.mean((x @ hat - y) ** 2))
  nearest = err(Q.fake_quant(w, s, z, 3))
  learned = err(Q.adaround_fake_quant_with(w, st.replace(alpha=alpha), hard=True))
  assert learned < 0.8 * nearest
  assert len(jax.tree_util.tree_leaves(st)) == 3
