"""The one convention of jaxlm's command-line tools (``python -m jaxlm.X``).

Every tool defines absl flags (a config file is an ml_collections config flag, overridable with
``--config.section.key=value``) in a ``define_flags()`` and its work in ``main(argv)``, and ends with

    if __name__ == "__main__":
        cli.run(main, define_flags)

Flags are defined only when the module runs as a program, so every tool's module is importable as a
library too. ``run`` then gives each tool the same behaviour:

* ``--help`` lists every flag of the tool;
* a bad flag (unknown, malformed, a config key that does not exist or a value of the wrong type, a
  config file that is not there), any :class:`jaxlm.errors.JaxlmError` raised while working, and an
  OSError about a path (unreadable, unwritable, a file where a directory belongs, a full disk) end
  as one ``error: <message>`` line on stderr and exit status 1 (2 for flags), never a traceback;
* library INFO logs (absl, Orbax, JAX) stay off the console; warnings and errors still show.
"""

from __future__ import annotations

import errno
import logging
import sys
from typing import Callable, NoReturn

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxlm import config as config_lib
from jaxlm.errors import ConfigError, JaxlmError

FLAGS = flags.FLAGS


def run(main: Callable[[list[str]], int | None], define_flags: Callable[[], None] | None = None) -> None:
    """Defines the tool's flags, parses them and runs `main` under jaxlm's error convention."""
    if define_flags is not None:
        define_flags()

    def guarded(argv):
        quiet_library_logs()
        try:
            return main(argv)
        except JaxlmError as e:
            fail(e)
        except OSError as e:  # a path the user gave that cannot be read or written (permissions, a file, no space)
            if e.filename is not None:
                fail(f"{e.filename}: {e.strerror}; check the path and its permissions")
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                fail(f"{e.strerror}; free space (or use a writable directory) and run the same command again")
            raise

    app.run(guarded, flags_parser=parse_flags)


CONFIG_HELP = ("Every key, with its default and meaning: jaxlm/configs/base.py; override one with "
               "--config.SECTION.KEY=VALUE, e.g. --config.train.steps=100")


def define_config(name: str = "config", help_text: str = "A config file, e.g. configs/tiny.py.") -> flags.FlagHolder:
    """An ml_collections config-file flag (locked, typed; ``--config.train.steps=5`` overrides), listed
    by the tool's ``--help`` with where its keys are documented."""
    holder = config_flags.DEFINE_config_file(name, None, f"{help_text} {CONFIG_HELP}.", lock_config=True)
    # absl's --help lists the program's key flags; this one is defined here, in jaxlm.cli
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])
    return holder


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with every error turned into one ``error:`` line (exit status 2)."""
    argv = _last_wins([_resolve_config_arg(a) for a in argv])
    try:
        rest = FLAGS(argv)
        for name in FLAGS:  # a config file flag's --config.* overrides are what the user set explicitly
            if config_flags.config_flags.is_config_flag(FLAGS[name]) and FLAGS[name].value is not None:
                config_lib.note_explicit(FLAGS[name].value, config_flags.get_override_values(FLAGS[name]))
        return rest
    except SystemExit:  # absl's --help printed the flags and exits 1; asking for help is no error
        if any(a.split("=")[0] in ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull") for a in argv[1:]):
            sys.exit(0)
        raise
    except flags.Error as e:
        fail(f"{config_lib.one_line(e)} (see --help)", status=2)
    except (AttributeError, KeyError) as e:  # a --config override of a key the schema does not have
        fail(f"{_override_arg(argv, e)}: unknown config key {config_lib.one_line(e)}", status=2)
    except (TypeError, ValueError) as e:  # a --config override ml_collections refused
        fail(f"{_override_arg(argv, e)}: {config_lib.one_line(e)}", status=2)


def fail(message, status: int = 1) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def require(**values) -> None:
    """Fails naming every flag that is missing (None or '')."""
    missing = [f"--{k}" for k, v in values.items() if v is None or v == ""]
    if missing:
        raise ConfigError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (see --help)")


def quiet_library_logs() -> None:
    """Only warnings and errors reach the console, and of Orbax's and gcsfs's only errors: their warnings
    describe their own bookkeeping (a read-only manager, intervals; a bucket's type without credentials),
    and jaxlm reports what matters about checkpoints and object stores."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = absl_logging.get_absl_handler()
    handler.setLevel(logging.WARNING)
    handler.addFilter(_not_orbax_below_error)
    logging.getLogger().setLevel(logging.WARNING)


def _not_orbax_below_error(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or not any(lib in record.pathname for lib in ("orbax", "gcsfs"))


def _resolve_config_arg(arg: str) -> str:
    """``--config=configs/tiny.py`` found from any directory (``config.resolve_path``), and run once
    through jaxlm's loader first (``config.read_file``), so that a file that does not run is one error
    line naming its file and line, not ml_collections' traceback."""
    for prefix in ("--config=", "-config="):
        if arg.startswith(prefix):
            try:
                path = config_lib.resolve_path(arg[len(prefix):])
                config_lib.read_file(path)
                return prefix + str(path)
            except JaxlmError as e:
                fail(e, status=2)
    return arg


def _last_wins(argv: list[str]) -> list[str]:
    """A ``--config.KEY=VALUE`` given twice: the last one (ml_collections would join two tuples), as absl
    does for any other flag."""
    last = {a.split("=", 1)[0]: i for i, a in enumerate(argv) if a.startswith(("--config.", "-config.")) and "=" in a}
    return [a for i, a in enumerate(argv)
            if not (a.startswith(("--config.", "-config.")) and "=" in a and last[a.split("=", 1)[0]] != i)]


def _override_arg(argv: list[str], error: BaseException) -> str:
    """The ``--config.*`` argument an ml_collections error is about (best effort)."""
    text = str(error)
    for a in argv:
        key = a.lstrip("-").split("=", 1)[0]
        if key.startswith("config.") and key.rsplit(".", 1)[-1] in text:
            return a
    return "a --config override"

