"""Package layout that pyproject.toml cannot express: the repository's top-level ``configs/``
folder (the single source of default configs) ships inside the package as
``evafusion_jax.configs``, so that an installed wheel finds its defaults
(``evafusion_jax.config.default_config_path``). Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=(find_packages(include=["evafusion_jax", "evafusion_jax.*"])
                + ["evafusion_jax.configs"]),
      package_dir={"evafusion_jax.configs": "configs"})
