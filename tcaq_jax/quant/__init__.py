"""Pure functional quantizers (imports nothing from the rest of tcaq_jax)."""
