"""Paths of the shipped demo assets (small model dirs written by `tcaq_jax.checkpoint.save_model_dir`).

DEMO_UNET_DIR: the digits DDIM UNet (config `ddim_digits`); CLASSIFIER_DIR: the demo's digit classifier (its
64-d penultimate layer is the demo's FID feature space). How they were made: README.md beside this file.
"""
import os

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
DEMO_UNET_DIR = os.path.join(ASSETS_DIR, 'demo_unet')
CLASSIFIER_DIR = os.path.join(ASSETS_DIR, 'digit_classifier')

__all__ = ['ASSETS_DIR', 'DEMO_UNET_DIR', 'CLASSIFIER_DIR']
