"""Default configs of every CLI (ml_collections files, loaded by path).

In a checkout this is the top-level ``configs/`` folder; an installed package holds the same
files as ``evafusion_jax/configs`` (see setup.py and ``evafusion_jax.config.default_config_path``).
"""
