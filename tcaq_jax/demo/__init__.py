"""The shipped digits demo: data (`data`), the digit classifier whose features are the demo's FID space
(`classifier`), and the demo UNet's pretraining (`pretrain`). Asset paths: `tcaq_jax.assets`."""
