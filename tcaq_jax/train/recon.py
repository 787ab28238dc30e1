"""BRECQ block reconstruction with AdaRound (and optional LSQ activation scales), jitted.

The loop runs in chunks: each chunk is one jitted `lax.fori_loop` that draws minibatches on device
(`jax.random.randint` indices into the block's captured inputs / targets), so Python only loops over chunks.

  loss(theta) = rec(block_q(theta, x), y) + lam * reg_on(it) * sum_alpha(1 - |2h - 1|^b(it))
  rec(a, y)   = mean over samples and positions of sum over channels of (a - y)^2     (BRECQ's lp_loss, p=2)

A non-finite loss stops the block: the update that produced it is discarded, the loop skips to the end of
the chunk and `NonFiniteLossError` names the block and the iteration; `.last_good` holds the last finite theta.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tcaq_jax.quant.adaround import b_schedule, rounding_regularizer

__all__ = ['ReconConfig', 'NonFiniteLossError', 'rec_loss', 'step_weights', 'make_optimizer', 'make_chunk', 'reconstruct',
           'make_eval', 'eval_selection', 'eval_set', 'eval_losses', 'eval_loss']


class NonFiniteLossError(FloatingPointError):
  """NaN/Inf in a block's loss. Attributes: block, iteration, last_good (theta before the bad update)."""

  def __init__(self, block: str, iteration: int, last_good: Any):
    super().__init__(f'non-finite reconstruction loss in block {block!r} at iteration {iteration}; the block '
                     f'is stopped and its last finite state kept')
    self.block = block
    self.iteration = iteration
    self.last_good = last_good


def _f(default, help_: str, flag: str | None = None, **meta):
  meta = {'help': help_, **meta} if flag is None else {'help': help_, 'flag': flag, **meta}
  return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class ReconConfig:
  """Settings of one reconstruction (nested in the calibration config as `recon`; the metadata 'flag' is the
  flag name where it differs from the field name)."""
  iters: int = _f(20000, 'AdaRound iterations per unit in the first reconstruction (scaled by --iters_scale)',
                  'recon_iters')
  batch: int | None = _f(None, "reconstruction minibatch size (default: the method's: 16 tcaq / qdiff_plus, 32 "
                               'qdiff)', 'recon_batch', kind=int)
  lam: float = _f(0.01, 'weight of the AdaRound rounding regulariser')
  b_start: float = _f(20.0, 'AdaRound annealing: exponent b at the start of the regularised phase')
  b_end: float = _f(2.0, 'AdaRound annealing: exponent b at the end')
  warmup: float = _f(0.2, 'share of the iterations without the rounding regulariser')
  lr: float = _f(1e-3, 'Adam learning rate of the AdaRound alphas')
  act_lr: float | None = _f(None, "Adam learning rate of learned activation scales (--learn_act_scale) (default: "
                                  "the method's: qdiff and tcaq 4e-4, qdiff_plus 4e-5)", kind=float)
  act_iters: int = _f(5000, 'iterations per unit of the activation-scale pass of --schedule=two_pass (scaled by '
                            '--iters_scale)')
  act_p: float = _f(2.4, 'loss exponent p of the activation-scale pass (sum over channels of |a - y|^p)')
  step_weight: float = _f(0.0, 'weight each sample of the reconstruction loss (and of the held-out check) by '
                               '|sigma_prev - sigma_t|^this of its sampler step, sigma = sqrt((1 - abar) / abar): '
                               "how far an eps error at that step moves the DDIM sample (eta 0, first order); "
                               'normalised to mean 1 over the sampler steps. 0 = every sample alike (BRECQ)',
                          'recon_step_weight')
  chunk: int = _f(1000, 'iterations per jitted call (progress and NaN checks between chunks)')
  loop: str = _f('auto', "'device': a chunk is one lax.fori_loop; 'host': a Python loop over one jitted "
                         "iteration (XLA:CPU runs while-loop bodies ~20x slower); 'auto': host on CPU", 'recon_loop',
                enum=('auto', 'device', 'host'))
  act_pass: bool = False          # set per round (not a flag): the activation pass, loss exponent act_p, cosine lr

  @property
  def batch_size(self) -> int:
    """The minibatch size (16 when unresolved)."""
    return 16 if self.batch is None else int(self.batch)

  @property
  def act_learning_rate(self) -> float:
    return 4e-5 if self.act_lr is None else float(self.act_lr)


def _device_loop(loop: str) -> bool:
  """'device': the chunk is one lax.fori_loop; 'host': a Python loop over one jitted iteration (XLA:CPU runs
  convolutions inside while-loop bodies ~20x slower than at top level, measured on this project's blocks);
  'auto': device except on CPU."""
  if loop == 'auto':
    return jax.default_backend() != 'cpu'
  if loop not in ('device', 'host'):
    raise ValueError(f"ReconConfig.loop must be 'auto', 'device' or 'host', got {loop!r}")
  return loop == 'device'


def rec_loss(pred, target, p: float = 2.0, weights=None):
  """Sum over the last (channel) axis of |error|^p, mean over the rest; summed over output leaves (Q-Diffusion's
  lp_loss with reduction 'none'; p = 2: BRECQ's MSE). weights [B]: each sample's error times its weight (then
  the mean over samples)."""
  def one(a, b):
    d = a.astype(jnp.float32) - b.astype(jnp.float32)
    e = jnp.sum(d * d if p == 2.0 else jnp.abs(d) ** p, axis=-1)
    if weights is None:
      return jnp.mean(e)
    return jnp.mean(jnp.mean(e.reshape(e.shape[0], -1), axis=1) * weights)
  leaves = jax.tree.leaves(jax.tree.map(one, pred, target))
  return sum(leaves)


def step_weights(alphas, alphas_prev, power: float) -> np.ndarray | None:
  """[sampler steps] float32 weights |sigma_prev - sigma_t|^power, sigma = sqrt((1 - abar) / abar) (abar of the
  step's timestep and of the next one in sampling order), normalised to mean 1; None for power 0 (uniform).
  An eps error d at a step moves the DDIM (eta 0) sample x / sqrt(abar) by (sigma_prev - sigma_t) * d."""
  if not power:
    return None
  sig = lambda a: np.sqrt((1.0 - np.asarray(a, np.float64)) / np.asarray(a, np.float64))  # noqa: E731
  w = np.abs(sig(alphas_prev) - sig(alphas)) ** float(power)
  return (w / w.mean()).astype(np.float32)


def _field_name(key) -> str | None:
  return getattr(key, 'name', getattr(key, 'key', None))


def _labels(theta):
  """'alpha' for AdaRound logits, 'act' for everything else (learned activation scales)."""
  return jax.tree_util.tree_map_with_path(lambda kp, _: 'alpha' if _field_name(kp[-1]) == 'alpha' else 'act',
                                          theta)


def _round_reg(theta, b):
  regs = [rounding_regularizer(st.alpha, b) for st in theta.values() if st.alpha is not None]
  return sum(regs) if regs else jnp.float32(0.)


def make_optimizer(cfg: ReconConfig) -> optax.GradientTransformation:
  """Adam on AdaRound alphas (lr) and on learned activation scales (act_lr)."""
  return optax.multi_transform({'alpha': optax.adam(cfg.lr), 'act': optax.adam(cfg.act_learning_rate)}, _labels)


def reconstruct(apply_fn: Callable, theta: dict, aux: Any, inputs: Sequence[jax.Array], targets: Any,
                steps: jax.Array, cfg: ReconConfig, key: jax.Array, block: str = '',
                progress: Callable | None = None, chunk_fn: Callable | None = None,
                loss_hook: Callable | None = None) -> tuple[dict, dict]:
  """Optimises theta ({layer path: LayerQState with alpha (and a_scale when learned)}) for one block.

  apply_fn(theta, aux, inputs_batch: list, steps_batch [B]) -> block output (soft rounding); aux: frozen
  arrays (params, other quantizer state) passed as jit arguments rather than baked-in constants;
  inputs: arrays [N, ...]; targets: [N, ...] (pytree); steps: [N] int step index of every sample.
  progress(done, total, loss, theta): called after every chunk. chunk_fn: a compiled chunk from `make_chunk`
  (reuse it across calls with the same apply_fn, set size and settings, e.g. PAR rounds); built when None, then
  with loss_hook(loss, iteration) -> loss applied to every iteration's loss (tests inject NaNs with it).
  Returns (theta, stats) with stats = {'iters', 'final_rec', 'final_total', 'seconds', 'it_per_s'}.
  """
  n = int(steps.shape[0])
  total = max(int(cfg.iters), 0)
  if total == 0 or not jax.tree.leaves(theta):
    return theta, {'iters': 0, 'final_rec': float('nan'), 'final_total': float('nan'), 'seconds': 0.0,
                   'it_per_s': 0.0}
  opt_state = make_optimizer(cfg).init(theta)
  if chunk_fn is None:
    chunk_fn = make_chunk(apply_fn, n, cfg, loss_hook)
  t0 = time.perf_counter()
  done, last_loss, last_rec = 0, float('nan'), float('nan')
  while done < total:
    length = min(cfg.chunk, total - done)
    th, st, bad, bad_it, loss_sum, rec_sum, cnt = chunk_fn(theta, opt_state, key, jnp.int32(done),
                                                           jnp.int32(length), jnp.float32(total), aux,
                                                           list(inputs), targets, steps)
    cnt = int(cnt)
    if bool(bad):
      raise NonFiniteLossError(block, int(bad_it), jax.device_get(th))
    theta, opt_state = th, st
    last_loss, last_rec = float(loss_sum) / max(cnt, 1), float(rec_sum) / max(cnt, 1)
    done += length
    logging.info('recon %s: %d/%d iters, loss %.5g (rec %.5g)', block, done, total, last_loss, last_rec)
    if progress is not None:
      progress(done, total, last_loss, theta)
  secs = time.perf_counter() - t0
  return theta, {'iters': total, 'final_rec': last_rec, 'final_total': last_loss, 'seconds': secs,
                 'it_per_s': total / max(secs, 1e-9)}


_SCHED_GRID = 1e6


def _batch_constraint(mesh, batch: int):
  """Minibatch sharding over the local devices (None on one device or when the batch does not split)."""
  if mesh is None:
    devices = jax.local_devices()
    if len(devices) < 2:
      return None
    from tcaq_jax.diffusion.sharding import batch_mesh
    mesh = batch_mesh(devices)
  if mesh.devices.size < 2 or batch % mesh.devices.size:
    return None
  from tcaq_jax.diffusion.sharding import batch_sharding
  shard = batch_sharding(mesh)
  return lambda tree: jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, shard), tree)


def make_chunk(apply_fn: Callable, n: int, cfg: ReconConfig, loss_hook: Callable | None = None,
               mesh=None, step_weights=None) -> Callable:
  """The compiled chunk: `length` (traced) iterations of minibatch sampling + Adam steps over a set of n
  samples, as one jitted fori_loop (device loop) or a host loop over one jitted iteration (see `_device_loop`).

  The total iteration count is traced too (one compile serves the 20k first pass and the 10k PAR rounds): the
  annealing is evaluated as b_schedule(it * G / total, G), which equals b_schedule(it, total). cfg.iters and
  cfg.chunk do not enter the compiled function. cfg.act_pass (Q-Diffusion's activation pass): loss exponent
  cfg.act_p, the updates scaled by (1 + cos(pi it / total)) / 2 (PyTorch's CosineAnnealingLR to 0, stepped after
  every iteration: Adam's update is linear in its learning rate), and no rounding regulariser. step_weights
  [sampler steps] (`step_weights`): each sample's error weighted by its step's. With several local devices (or a `mesh`), every minibatch is
  split over them along the batch axis (XLA partitions the block forward / backward and sums the gradients);
  theta and the captured set stay replicated.
  """
  opt = make_optimizer(cfg)
  batch = cfg.batch_size
  constrain = _batch_constraint(mesh, batch)
  p = float(cfg.act_p) if cfg.act_pass else 2.0

  def loss_fn(th, aux, xb, yb, sb, it, total):
    rec = rec_loss(apply_fn(th, aux, xb, sb), yb, p, None if step_weights is None else step_weights[sb])
    if cfg.act_pass:
      loss = rec
    else:
      b, on = b_schedule(it.astype(jnp.float32) * (_SCHED_GRID / total), _SCHED_GRID, cfg.warmup, cfg.b_start,
                         cfg.b_end)
      loss = rec + cfg.lam * on * _round_reg(th, b)
    if loss_hook is not None:
      loss = loss_hook(loss, it)
    return loss, rec

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def make_body(key, start, total, aux, inputs, targets, steps):
    def body(i, carry):
      th, st, bad, bad_it, loss_sum, rec_sum, cnt = carry
      it = start + i
      k = jax.random.fold_in(key, it)
      idx = jax.random.randint(k, (batch,), 0, n)
      xb = [a[idx] for a in inputs]
      yb = jax.tree.map(lambda a: a[idx], targets)
      sb = steps[idx]
      if constrain is not None:
        xb, yb, sb = constrain((xb, yb, sb))
      (loss, rec), g = grad_fn(th, aux, xb, yb, sb, it, total)
      upd, st2 = opt.update(g, st, th)
      if cfg.act_pass:
        lr_factor = 0.5 * (1. + jnp.cos(jnp.pi * it.astype(jnp.float32) / total))
        upd = jax.tree.map(lambda u: u * lr_factor, upd)
      th2 = optax.apply_updates(th, upd)
      ok = jnp.isfinite(loss) & jnp.logical_not(bad) & jax.tree.reduce(
          lambda a, b: a & b, jax.tree.map(lambda v: jnp.all(jnp.isfinite(v)), th2))
      sel = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
      newly_bad = jnp.logical_not(ok) & jnp.logical_not(bad)
      return (sel(th2, th), sel(st2, st), bad | newly_bad, jnp.where(newly_bad, it, bad_it),
              loss_sum + jnp.where(ok, loss, 0.), rec_sum + jnp.where(ok, rec, 0.), cnt + ok.astype(jnp.int32))
    return body

  def init_carry(th, st):
    return (th, st, jnp.bool_(False), jnp.int32(-1), jnp.float32(0.), jnp.float32(0.), jnp.int32(0))

  i32, f32 = jnp.int32(0), jnp.float32(1)         # the dtypes `reconstruct` passes (for precompile)
  if _device_loop(cfg.loop):
    def chunk_fn(th, st, key, start, length, total, aux, inputs, targets, steps):
      body = make_body(key, start, total, aux, inputs, targets, steps)
      return jax.lax.fori_loop(0, length, body, init_carry(th, st))
    device_chunk = jax.jit(chunk_fn)
    device_chunk.precompile = lambda th, aux, inputs, targets, steps, key: device_chunk.lower(
        th, jax.eval_shape(opt.init, th), key, i32, i32, f32, aux, inputs, targets, steps).compile()
    return device_chunk

  step_jit = jax.jit(lambda i, carry, *a: make_body(*a)(i, carry))

  def host_chunk(th, st, key, start, length, total, aux, inputs, targets, steps):
    carry = init_carry(th, st)
    for i in range(int(length)):
      carry = step_jit(jnp.int32(i), carry, key, start, total, aux, inputs, targets, steps)
    return carry

  host_chunk.precompile = lambda th, aux, inputs, targets, steps, key: step_jit.lower(
      i32, jax.eval_shape(init_carry, th, jax.eval_shape(opt.init, th)), key, i32, f32, aux, inputs, targets,
      steps).compile()
  return host_chunk


def make_eval(apply_fn: Callable, step_weights=None) -> Callable:
  """Compiled fn(theta, aux, sets) -> {name: rec_loss summed over the set's selected samples} (sets: {name:
  set}). A set is (inputs, targets, steps, sel) with sel: [batches, batch] indices into the whole set
  (`eval_set`). The batches' gathers run inside the program, and sets of equal batch size (the reconstruction
  set and the held-out set) are joined into one scan over their batches: one call, one loop body to compile.
  step_weights: as in `make_chunk`."""
  def run(th, ax, sets):
    groups: dict = {}
    for name, st in sets.items():
      groups.setdefault(st[3].shape[1], []).append(name)
    out = {}
    for names in groups.values():
      parts = [sets[k] for k in names]
      cat = lambda *a: a[0] if len(a) == 1 else jnp.concatenate(a)  # noqa: E731
      xs = [cat(*leaf) for leaf in zip(*(p[0] for p in parts))]
      ys = jax.tree.map(cat, *(p[1] for p in parts))
      ss = cat(*(p[2] for p in parts))
      offsets = np.cumsum([0] + [p[2].shape[0] for p in parts[:-1]])
      sel = cat(*(p[3] + int(o) for p, o in zip(parts, offsets)))

      def body(_, ix):
        pred = apply_fn(th, ax, [a[ix] for a in xs], ss[ix])
        w = None if step_weights is None else step_weights[ss[ix]]
        return None, rec_loss(pred, jax.tree.map(lambda a: a[ix], ys), weights=w) * ix.shape[0]

      sums = jax.lax.scan(body, None, sel)[1]
      ends = np.cumsum([p[3].shape[0] for p in parts])
      for k, lo, hi in zip(names, [0, *ends[:-1]], ends):
        out[k] = jnp.sum(sums[lo:hi])
    return out
  return jax.jit(run)


def eval_selection(total: int, max_samples: int = 256, batch: int = 64) -> np.ndarray:
  """[batches, b] int32 indices of min(total, max_samples) evenly spaced samples in equal batches (b = batch,
  or all of them when they are fewer; the count is rounded down to whole batches); shape (0, 0) for an empty
  set. Its shape is the evaluator's compiled shape."""
  n = min(total, max_samples)
  n = n - n % batch if n > batch else n
  if n == 0:
    return np.zeros((0, 0), np.int32)
  b = min(n, batch)
  return np.linspace(0, total - 1, n).round().astype(np.int32).reshape(n // b, b)


def precompile_chunk(chunk_fn: Callable, theta: dict, aux: Any, inputs: Sequence, targets: Any, steps: Any,
                     seed: int = 0) -> None:
  """Compiles a `make_chunk` chunk for these arguments (arrays or jax.ShapeDtypeStruct) without running it: the
  later `reconstruct` call with arrays of the same shapes finds it compiled."""
  chunk_fn.precompile(theta, aux, list(inputs), targets, steps, jax.random.PRNGKey(seed))


def eval_set(inputs: Sequence, targets: Any, steps: Any, max_samples: int = 256, batch: int = 64) -> tuple | None:
  """(inputs, targets, steps, sel) for `make_eval`'s program: max_samples evenly spaced samples of the set
  (`eval_selection`); None for an empty set. Arrays, or jax.ShapeDtypeStruct to precompile (sel then abstract)."""
  sel = eval_selection(int(steps.shape[0]), max_samples, batch)
  if sel.size == 0:
    return None
  sel = jax.ShapeDtypeStruct(sel.shape, sel.dtype) if isinstance(steps, jax.ShapeDtypeStruct) else jnp.asarray(sel)
  return list(inputs), targets, steps, sel


def eval_losses(eval_fn: Callable, theta: dict, aux: Any, sets: dict) -> dict:
  """{name: mean rec_loss on that set} for sets {name: set from `eval_set`}, in one call of eval_fn (from
  `make_eval`); {} for no sets (nothing is called)."""
  if not sets:
    return {}
  sums = eval_fn(theta, aux, sets)
  return {k: float(v) / int(sets[k][3].size) for k, v in sums.items()}


def eval_loss(eval_fn: Callable, theta: dict, aux: Any, inputs: Sequence[jax.Array], targets: Any,
              steps: jax.Array, batch: int = 64, max_samples: int = 256) -> float:
  """Mean rec_loss over max_samples evenly spaced samples of one set (`eval_selection`; 0.0 for an empty
  set); eval_fn from `make_eval(apply_fn)`."""
  st = eval_set(inputs, targets, steps, max_samples, batch)
  return 0.0 if st is None else eval_losses(eval_fn, theta, aux, {'set': st})['set']
