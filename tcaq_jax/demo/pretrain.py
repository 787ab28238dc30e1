"""Trains the demo DDIM UNet (config ddim_digits) on scikit-learn's digits at 16x16.

  python -m tcaq_jax.demo.pretrain --out_dir tcaq_jax/assets/demo_unet --steps 2000

eps-prediction MSE at uniform t in [0, T) (antithetic pairs t, T-1-t as in the DDIM repo), Adam with warmup and
cosine decay, global-norm clipping, an EMA of the params (what ships), one jitted train step. A run directory
(--run_dir) gets an orbax checkpoint every --ckpt_every steps and a resumed run continues from it; the run stops
early at --max_minutes (the step reached is recorded in the model dir's meta). --steps, --batch_size,
--log_every, --ckpt_every below 1 and a negative --warmup / --max_minutes end in one `error: ...` line.
"""
from __future__ import annotations

import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags, logging

from tcaq_jax import checkpoint
from tcaq_jax.assets import DEMO_UNET_DIR
from tcaq_jax.demo.data import load_digits_16
from tcaq_jax.diffusion.schedules import schedule_from_config
from tcaq_jax.models.configs import build_model, get_config

FLAGS = flags.FLAGS


class PretrainError(ValueError):
  """A pretraining flag is out of range (the message names the flag)."""


def check_flags(f=FLAGS) -> None:
  """Refuses size flags that would divide by zero or train nothing, naming the flag (f: the parsed flags)."""
  for name in ('steps', 'batch_size', 'log_every', 'ckpt_every'):
    if getattr(f, name) < 1:
      raise PretrainError(f'--{name}={getattr(f, name)}: must be a positive integer')
  if f.warmup < 0 or f.max_minutes < 0:
    bad = 'warmup' if f.warmup < 0 else 'max_minutes'
    raise PretrainError(f'--{bad}={getattr(f, bad)}: must be >= 0')


def make_train_step(model, tx, alpha_bar: np.ndarray, data: jnp.ndarray, batch_size: int, ema_decay: float):
  """Returns step(state, key) -> (state, loss); state = (params, ema, opt_state, n)."""
  sqrt_ab = jnp.asarray(np.sqrt(alpha_bar), jnp.float32)
  sqrt_1mab = jnp.asarray(np.sqrt(1.0 - alpha_bar), jnp.float32)
  T = alpha_bar.shape[0]

  @jax.jit
  def step(state, key):
    params, ema, opt_state, n = state
    k_idx, k_t, k_eps = jax.random.split(key, 3)
    x0 = data[jax.random.randint(k_idx, (batch_size,), 0, data.shape[0])]
    t_half = jax.random.randint(k_t, (batch_size // 2 + 1,), 0, T)
    t = jnp.concatenate([t_half, T - 1 - t_half])[:batch_size]
    eps = jax.random.normal(k_eps, x0.shape)
    xt = sqrt_ab[t][:, None, None, None] * x0 + sqrt_1mab[t][:, None, None, None] * eps

    def loss_fn(p):
      return jnp.mean((model.apply({'params': p}, xt, t) - eps) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
    return (params, ema, opt_state, n + 1), loss

  return step


def main(argv):
  del argv
  check_flags()
  checkpoint.quiet_orbax_logs()
  config = get_config(FLAGS.config)
  model = build_model(config)
  alpha_bar = schedule_from_config(config)
  images, _ = load_digits_16()
  data = jnp.asarray(images)
  key = jax.random.PRNGKey(FLAGS.seed)
  res, cin = config['resolution'], config['in_channels']
  params = model.init(key, jnp.zeros((1, res, res, cin)), jnp.zeros((1,), jnp.int32))['params']
  n_params = sum(int(a.size) for a in jax.tree.leaves(params))
  logging.info('%s: %d parameters, %d training images', config['name'], n_params, data.shape[0])
  sched = optax.warmup_cosine_decay_schedule(0.0, FLAGS.lr, FLAGS.warmup, FLAGS.steps, FLAGS.lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(FLAGS.grad_clip), optax.adam(sched))
  state = (params, params, tx.init(params), jnp.zeros((), jnp.float32))
  start = 0
  last = checkpoint.latest_step(FLAGS.run_dir)
  if last is not None:
    ck = checkpoint.restore(FLAGS.run_dir, params_target=state)
    state, start = jax.tree.map(jnp.asarray, ck['params']), int(last)
    logging.info('resumed %s at step %d', FLAGS.run_dir, start)
  step_fn = make_train_step(model, tx, alpha_bar, data, FLAGS.batch_size, FLAGS.ema_decay)
  t0, losses, steps_done = time.time(), [], start
  for step in range(start, FLAGS.steps):
    state, loss = step_fn(state, jax.random.fold_in(key, step + 1))
    losses.append(loss)
    steps_done = step + 1
    if (step + 1) % FLAGS.log_every == 0:
      logging.info('step %d loss %.4f (%.2f steps/s)', step + 1, float(jnp.mean(jnp.stack(losses))),
                   (step + 1 - start) / (time.time() - t0))
      losses = []
    if (step + 1) % FLAGS.ckpt_every == 0:
      checkpoint.save(FLAGS.run_dir, step + 1, state, keep=2)
    if FLAGS.max_minutes and time.time() - t0 > 60 * FLAGS.max_minutes:
      logging.warning('stopping at step %d: --max_minutes %.1f reached', step + 1, FLAGS.max_minutes)
      break
  if steps_done % FLAGS.ckpt_every:
    checkpoint.save(FLAGS.run_dir, steps_done, state, keep=2)
  ema = state[1]
  if os.path.isfile(os.path.join(FLAGS.out_dir, 'config.json')):  # replace an older model dir
    shutil.rmtree(FLAGS.out_dir)
  checkpoint.save_model_dir(FLAGS.out_dir, ema, config, extra={
      'trained_steps': steps_done, 'batch_size': FLAGS.batch_size, 'lr': FLAGS.lr, 'ema_decay': FLAGS.ema_decay,
      'seed': FLAGS.seed, 'num_params': n_params, 'data': 'sklearn load_digits, bilinear 8x8->16x16, [-1,1]',
      'minutes': (time.time() - t0) / 60})
  logging.info('wrote EMA params after %d steps to %s', steps_done, FLAGS.out_dir)


def define_flags():
  """The CLI's flags (defined here, not at import, so importing the module defines nothing)."""
  flags.DEFINE_string('config', 'ddim_digits', 'model config name')
  flags.DEFINE_string('out_dir', DEMO_UNET_DIR, 'model dir to write (EMA params + config.json)')
  flags.DEFINE_string('run_dir', '/tmp/tcaq_pretrain_run', 'resumable training checkpoints')
  flags.DEFINE_integer('steps', 2000, 'train steps')
  flags.DEFINE_integer('batch_size', 64, 'batch size')
  flags.DEFINE_float('lr', 2e-3, 'peak learning rate')
  flags.DEFINE_integer('warmup', 100, 'linear warmup steps')
  flags.DEFINE_float('ema_decay', 0.995, 'EMA decay (with the (1+n)/(10+n) warm start)')
  flags.DEFINE_float('grad_clip', 1.0, 'global-norm clip')
  flags.DEFINE_integer('seed', 0, 'seed')
  flags.DEFINE_integer('log_every', 50, 'log interval (steps)')
  flags.DEFINE_integer('ckpt_every', 250, 'checkpoint interval (steps)')
  flags.DEFINE_float('max_minutes', 0.0, 'stop after this wall time (0: no limit)')


if __name__ == '__main__':   # run the package module's main: its error classes are then tcaq_jax's, not __main__'s
  from tcaq_jax import cli
  from tcaq_jax.demo import pretrain as _pretrain
  _pretrain.define_flags()
  cli.run(_pretrain.main)
