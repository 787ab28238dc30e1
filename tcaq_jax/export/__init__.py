"""Export a finished calibration run as a small integer model dir, and load one for sampling.

  python -m tcaq_jax.export --run_dir runs/calib/demo_w8a8 --out exports/demo_w8a8
  m = load_exported('exports/demo_w8a8'); eps = m.eps_fn('int')     # or 'fake'
format.py: the files and their checks; writer.py: run dir -> exported dir; loader.py: exported dir -> eps_fn.
"""
from tcaq_jax.export.format import ExportError
from tcaq_jax.export.loader import BACKENDS, ExportedModel, load_exported
from tcaq_jax.export.writer import export_quantized, export_run

__all__ = ['ExportError', 'BACKENDS', 'ExportedModel', 'load_exported', 'export_quantized', 'export_run']
