"""Tests for evafusion_jax.config."""

import textwrap

import pytest

from evafusion_jax import config as config_lib


def test_parse_cli_config(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text(textwrap.dedent("""
        import ml_collections
        def get_config():
            c = ml_collections.ConfigDict()
            c.lr = 0.1
            c.sub = ml_collections.ConfigDict({"n": 2})
            return c
    """))
    cfg = config_lib.parse_cli_config(["prog", "--config.lr=0.5", "--config.sub.n=7"], str(cfg_file))
    assert cfg.lr == 0.5 and cfg.sub.n == 7
    cfg = config_lib.parse_cli_config(["prog"], str(cfg_file))
    assert cfg.lr == 0.1
    with pytest.raises(BaseException):
        config_lib.parse_cli_config(["prog", "--config.nope=1"], str(cfg_file))
