"""benchmarks/host_devices.py: the --devices option read before JAX starts."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "host_devices.py"


@pytest.fixture(scope="module")
def hd():
    spec = importlib.util.spec_from_file_location("host_devices", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_argv_int_both_spellings_and_absent(hd):
    assert hd.argv_int(["--size", "64", "--devices", "2"], "--devices") == 2
    assert hd.argv_int(["--devices=4", "--batch", "8"], "--devices") == 4
    assert hd.argv_int(["--batch", "8"], "--devices") is None
    assert hd.argv_int(["--devices"], "--devices") is None          # no value
    assert hd.argv_int(["--devices", "two"], "--devices") is None   # not a number
    assert hd.argv_int(["--devices-x", "3"], "--devices") is None   # another option
    assert hd.argv_int(["--devices", "2", "--devices=4"], "--devices") == 4  # the last, as argparse


def test_force_host_device_count_keeps_an_existing_count(hd, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_onednn=false")
    hd.force_host_device_count(2)
    assert hd.os.environ["XLA_FLAGS"] == ("--xla_cpu_use_onednn=false "
                                          "--xla_force_host_platform_device_count=2")
    hd.force_host_device_count(4)  # a count is already set: unchanged
    assert hd.os.environ["XLA_FLAGS"].endswith("device_count=2")
    monkeypatch.delenv("XLA_FLAGS")
    hd.force_host_device_count(1)  # one device is JAX's default: nothing set
    assert "XLA_FLAGS" not in hd.os.environ
