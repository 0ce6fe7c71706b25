"""Config files and their command line, for every CLI: ``--config FILE --config.a.b=VALUE``.

* :func:`default_config_path`: a default config file (``configs/<name>`` of a checkout, or the
  copy installed with the package as ``evafusion_jax/configs``).
* :func:`parse_cli_config`: the command line -> ``ml_collections.ConfigDict`` (``--help`` lists
  every field; an unknown key names the closest one).
* :class:`ConfigError`: a config field is invalid (bad value, inconsistent with a checkpoint or
  the data); the CLIs exit with code 2 (:mod:`evafusion_jax.cli`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


class ConfigError(ValueError):
    """A config field is invalid, or inconsistent with a checkpoint or the data."""


def default_config_path(name: str) -> str:
    """The default config file ``name`` (e.g. ``"grpo.py"``).

    The copy installed inside the package (``evafusion_jax/configs/``, a wheel) or, in a checkout
    (also an editable install), the repository's ``configs/`` folder next to the package; never a
    path relative to the working directory. If neither holds ``name``, the checkout path is
    returned (``parse_cli_config`` then says that it does not exist).
    """
    package = Path(__file__).resolve().parent
    installed = package / "configs" / name
    if installed.is_file():
        return str(installed)
    return str(package.parent / "configs" / name)


def _flat_fields(cfg, prefix: str = "") -> dict:
    """``{"a.b": value}`` of every leaf field of a ConfigDict."""
    import ml_collections
    out = {}
    for k in sorted(cfg.keys()):
        v = cfg[k]
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_flat_fields(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_path_of(argv: Sequence[str], default: str, flag_name: str) -> str:
    path = default
    for i, a in enumerate(argv):
        if a == f"--{flag_name}" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith(f"--{flag_name}="):
            path = a.split("=", 1)[1]
    return path


def load_config_file(path: str, flag_name: str = "config"):
    """The ``ml_collections.ConfigDict`` of a config file (no overrides)."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(flag_name, default=path, flag_values=fv,
                                             lock_config=False, sys_argv=["prog"])
    fv(["prog"])
    return holder.value


def unknown_key_message(cfg, dotted: str, where: str) -> str | None:
    """A message naming the first component of ``dotted`` that ``cfg`` lacks, with the closest
    existing key; None when the whole path exists."""
    import ml_collections

    from evafusion_jax.cli import suggest
    node, done = cfg, []
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return (f"{where}: {'.'.join(done)} is a value, not a group: there is no "
                    f"{'.'.join(done + [part])}")
        if part not in node:
            known = list(node.keys())
            full = ".".join(done + [part])
            prefix = ".".join(done) + "." if done else ""
            return (f"{where}: unknown config key {full!r}"
                    + suggest(part, known, prefix=prefix)
                    + f" (keys here: {', '.join(sorted(known)[:30])})")
        node, done = node[part], done + [part]
    return None


def check_config_keys(cfg, reference, where: str) -> None:
    """Raises ``cli.UsageError`` when ``cfg`` (e.g. a user's config file) has a key the
    ``reference`` config lacks (a typo: the closest key is suggested) or lacks one it has."""
    from evafusion_jax.cli import UsageError, suggest

    have, want = _flat_fields(cfg), _flat_fields(reference)
    extra = [k for k in have if k not in want and not any(k.startswith(w + ".") for w in want)]
    if extra:
        raise UsageError(f"{where}: unknown config key {extra[0]!r}{suggest(extra[0], list(want))}"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    missing = [k for k in want if k not in have and not any(k.startswith(h + ".") for h in have)]
    if missing:
        raise UsageError(f"{where}: the config lacks the key(s) {', '.join(missing[:10])} "
                         "(start from the default config file and change values)")


def config_help(argv0: str, description: str, cfg, config_path: str,
                flag_name: str = "config") -> str:
    """``--help`` text: the program's description and every config field with its value."""
    lines = [(description or "").strip(), "",
             f"usage: {argv0} [--{flag_name} FILE] [--{flag_name}.FIELD=VALUE ...]", "",
             f"Config fields (values from {config_path}):"]
    lines += [f"  --{flag_name}.{k}={v!r}" for k, v in _flat_fields(cfg).items()]
    return "\n".join(lines) + "\n"


def parse_cli_config(argv: Sequence[str], default_config_path: str,
                     flag_name: str = "config", description: str | None = None):
    """Parses ``--config PATH --config.a.b=value ...`` into an ``ml_collections.ConfigDict``.

    ``argv[0]`` is the program name (as in ``sys.argv``). Uses absl
    ``config_flags.DEFINE_config_file`` on a private ``FlagValues``, so it
    can be called several times in one process (tests). ``--help`` / ``-h`` prints
    ``description`` and every field, then exits with 0. An unknown field (on the command
    line or in a config file other than the default) raises ``cli.UsageError`` naming it
    and the closest existing one; so does a bad value.
    """
    from absl import flags
    from ml_collections import config_flags

    from evafusion_jax.cli import UsageError

    argv = list(argv)
    path = _config_path_of(argv[1:], default_config_path, flag_name)
    if not os.path.isfile(path.split(":", 1)[0]):
        raise UsageError(f"config file {path} does not exist (--{flag_name} FILE)")
    if any(a in ("--help", "-h", "--helpfull", "-help") for a in argv[1:]):
        import sys
        cfg = load_config_file(path, flag_name)
        sys.stdout.write(config_help(argv[0], description or "", cfg, path, flag_name))
        raise SystemExit(0)
    fv = flags.FlagValues()
    try:
        holder = config_flags.DEFINE_config_file(flag_name, default=default_config_path,
                                                 flag_values=fv, lock_config=False,
                                                 sys_argv=list(argv))
        fv(list(argv))
        cfg = holder.value
    except (AttributeError, KeyError) as e:
        try:
            base = load_config_file(path, flag_name)
        except Exception:  # noqa: BLE001 - the original error is reported below
            base = None
        for a in argv[1:]:
            if a.startswith(f"--{flag_name}.") and base is not None:
                key = a[len(flag_name) + 3:].split("=", 1)[0]
                msg = unknown_key_message(base, key, f"command-line flag {a}")
                if msg:
                    raise UsageError(msg) from None
        raise UsageError(f"error in command-line flags: {e}") from None
    except flags.Error as e:
        raise UsageError(f"error in command-line flags: {e}") from None
    except (FileNotFoundError, OSError, SyntaxError, ImportError) as e:
        raise UsageError(f"cannot load the config file {path}: {e}") from None
    if os.path.abspath(path) != os.path.abspath(default_config_path):
        check_config_keys(load_config_file(path, flag_name), load_config_file(
            default_config_path, flag_name), f"config file {path}")
    return cfg
