"""python -m tcaq_jax.export --run_dir RUN --out DIR [--overwrite]: writes RUN's calibrated model as an integer
model dir (see tcaq_jax/export/format.py) and prints its size against the float weights, and which quantized
points run on the integer path."""
from __future__ import annotations

from absl import flags

from tcaq_jax import cli
from tcaq_jax.checkpoint import quiet_orbax_logs

flags.DEFINE_string('run_dir', None, 'a finished `python -m tcaq_jax.train.calibrate` --out_dir')
flags.DEFINE_string('out', None, 'the exported model dir to write')
flags.DEFINE_bool('overwrite', False, 'replace an existing --out')
flags.mark_flags_as_required(['run_dir', 'out'])


def main(argv):
  del argv
  quiet_orbax_logs()
  from tcaq_jax.export import export_run, load_exported
  f = flags.FLAGS
  manifest = export_run(f.run_dir, f.out, overwrite=f.overwrite)
  sizes = manifest['sizes']
  m = load_exported(f.out)
  n_int = sum(r == 'int' for r in m.routes.values())
  print(f'wrote {f.out}: {sizes["export_bytes"] / 1e6:.3f} MB (quantized weights + scales '
        f'{sizes["quantized_weights_bytes"] / 1e6:.3f} MB, other {sizes["other_bytes"] / 1e6:.3f} MB); float32 '
        f'weights {sizes["float_params_bytes"] / 1e6:.3f} MB; ratio {sizes["export_bytes"] / sizes["float_params_bytes"]:.3f}')
  print(f'integer path: {n_int} of {len(m.routes)} quantized layers / points; fake quant: '
        + (', '.join(f'{p} ({r})' for p, r in m.fallback().items()) or 'none'))


if __name__ == '__main__':
  cli.run(main)
