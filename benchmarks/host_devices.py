"""``--devices`` for the benchmark scripts, read before JAX starts (no JAX import here).

XLA's number of host (CPU) devices is fixed when JAX starts, by
``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``; a script that splits its batch
over N CPU devices reads its ``--devices`` from ``sys.argv`` and sets the flag first.
"""

from __future__ import annotations

import os


def argv_int(argv, name: str):
    """The integer given to option ``name`` in ``argv`` (``name N`` or ``name=N``; the last
    one when given twice, as argparse reads it), else None."""
    found = None
    for i, a in enumerate(argv):
        val = a.split("=", 1)[1] if a.startswith(name + "=") else (
            argv[i + 1] if a == name and i + 1 < len(argv) else None)
        if val is not None and val.isdigit():
            found = int(val)
    return found


def force_host_device_count(n: int) -> None:
    """Ask XLA for ``n`` CPU devices (unless ``XLA_FLAGS`` already sets a count); call it
    before JAX starts."""
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
