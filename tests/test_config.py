"""Tests for evafusion_jax.config."""

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from evafusion_jax import config as config_lib

REPO = Path(__file__).resolve().parent.parent


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
    cfg = config_lib.parse_cli_config(["prog", "--config.lr=0.5", "--config.sub.n=7"],
                                      str(cfg_file))
    assert cfg.lr == 0.5 and cfg.sub.n == 7
    cfg = config_lib.parse_cli_config(["prog"], str(cfg_file))
    assert cfg.lr == 0.1
    with pytest.raises(BaseException):
        config_lib.parse_cli_config(["prog", "--config.nope=1"], str(cfg_file))


def test_default_config_path_is_the_checkout_configs_folder():
    for name in ("reward.py", "grpo.py", "regions.py", "experiments.py"):
        assert Path(config_lib.default_config_path(name)) == REPO / "configs" / name


@pytest.mark.slow
def test_installed_wheel_finds_its_default_configs(tmp_path):
    """A wheel built from the checkout (no network, no deps) and installed without ``-e`` holds
    configs/ as evafusion_jax/configs: CLIs run from another folder print the defaults."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a copy, so that the build writes nothing into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "evafusion_jax", src / "evafusion_jax", ignore=ignore)
    shutil.copytree(REPO / "configs", src / "configs", ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PIP_NO_INDEX"] = "1"
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "w"),
                          str(src)], check=True, env=env, cwd=tmp_path, capture_output=True)
    (wheel,) = (tmp_path / "w").glob("evafusion_jax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert "evafusion_jax/configs/grpo.py" in z.namelist()
    target = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, env=env, cwd=tmp_path, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env["PYTHONPATH"] = str(target)
    for prog, field in (("train_grpo", "--config.objective='grpo'"),
                        ("train_reward", "--config.mode='train'")):
        out = subprocess.run([sys.executable, "-m", f"evafusion_jax.{prog}", "--help"], env=env,
                             cwd=elsewhere, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"values from {target / 'evafusion_jax' / 'configs'}" in out.stdout, out.stdout[:500]
        assert field in out.stdout
