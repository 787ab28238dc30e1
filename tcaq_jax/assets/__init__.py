"""Paths of the shipped demo assets (small model dirs written by `tcaq_jax.checkpoint.save_model_dir`).

DEMO_UNET_DIR: the digits DDIM UNet (config `ddim_digits`); CLASSIFIER_DIR: the demo's digit classifier (its
64-d penultimate layer is the demo's FID feature space). How they were made: README.md beside this file.
"""
import os

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
DEMO_UNET_DIR = os.path.join(ASSETS_DIR, 'demo_unet')
CLASSIFIER_DIR = os.path.join(ASSETS_DIR, 'digit_classifier')
# The FP half of the demo's end-of-run quality check at its default settings (a constant of the shipped model,
# like FID reference statistics): written by bench/demo_fp_reference.py, read by tcaq_jax.train.calibrate.
DEMO_FP_REFERENCE = os.path.join(ASSETS_DIR, 'demo_fp_quality.json')

__all__ = ['ASSETS_DIR', 'DEMO_UNET_DIR', 'CLASSIFIER_DIR', 'DEMO_FP_REFERENCE']
