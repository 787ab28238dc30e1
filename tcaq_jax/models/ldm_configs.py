"""Latent-diffusion named configs (filled in by the LDM models work)."""
LDM_CONFIGS: dict = {}
