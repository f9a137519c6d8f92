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
  as one ``error: <message>`` line on stderr and exit status 1 (2 for flags), never a traceback; the
  line comes last (a single process leaves at once, before the libraries' threads can add to it);
* library INFO logs (absl, Orbax, JAX) stay off the console, and Orbax's and gcsfs's errors too (jaxlm
  reports what fails); ``--verbose`` shows them all;
* XLA's compiled programs are kept in the machine's cache (``compile_cache``), so a second run of the
  same model and shapes loads its step instead of compiling it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import threading
from typing import Callable, NoReturn

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxlm import config as config_lib
from jaxlm import distributed, paths
from jaxlm.errors import ConfigError, JaxlmError

FLAGS = flags.FLAGS


def run(main: Callable[[list[str]], int | None], define_flags: Callable[[], None] | None = None) -> None:
    """Defines the tool's flags, parses them and runs `main` under jaxlm's error convention."""
    if define_flags is not None:
        define_flags()
    if "verbose" not in FLAGS:
        flags.DEFINE_bool("verbose", False, "Library logs (Orbax's and gcsfs's errors among them) on the console.")

    def guarded(argv):
        compile_cache()
        if not FLAGS.verbose:
            quiet_library_logs()
            sys.stderr = LibraryTracebacks(sys.stderr)
            threading.excepthook = _library_thread_exception
        _state["working"] = True
        try:
            return main(argv)
        except JaxlmError as e:
            fail(e)
        except OSError as e:  # a path the user gave that cannot be read or written (permissions, a file, no space)
            if e.filename is not None and e.errno not in NO_SPACE:
                fail(f"{e.filename}: {e.strerror}; check the path and its permissions")
            if e.errno == errno.EROFS:
                fail(f"{e.strerror}; use a writable directory and run the same command again")
            if (why := no_space(e)) is not None:
                fail(why)
            raise
        except Exception as e:  # a library's error whose cause is a full disk (Orbax: RESOURCE_EXHAUSTED ...)
            if (why := no_space(e)) is not None:
                fail(why)
            raise

    app.run(guarded, flags_parser=parse_flags)


# Programs that compile faster than this are compiled again rather than read back (the read costs about
# as much); measured on the tiny config, PERFORMANCE.md "The seconds before the first step".
MIN_COMPILE_S = 0.5


def compile_cache() -> None:
    """JAX's persistent compilation cache in ``paths.machine_cache()/xla``: keyed by the program, the
    devices, the flags and the jax/jaxlib versions, so a hit is the same executable. JAX's own
    ``JAX_COMPILATION_CACHE_DIR`` and ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` win;
    ``JAXLM_XLA_CACHE=0`` turns it off."""
    if os.environ.get("JAXLM_XLA_CACHE", "1") == "0" or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(paths.machine_cache() / "xla"))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)


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
        fail(_flag_error(config_lib.one_line(e)), status=2)
    except (AttributeError, KeyError) as e:  # a --config override of a key the schema does not have
        arg = _override_arg(argv)
        key = arg.lstrip("-").split("=", 1)[0].removeprefix("config.")
        fail(f"{arg}: {config_lib.unknown_key(key) if arg.startswith('-') else config_lib.one_line(e)}", status=2)
    except (TypeError, ValueError) as e:  # a --config override ml_collections refused
        fail(f"{_override_arg(argv)}: {config_lib.one_line(e)}", status=2)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_state = {"working": False}  # main() started: libraries may run threads that print at interpreter exit


def no_space(error: BaseException) -> str | None:
    """The one line for an error whose cause (anywhere in its chain) is a full disk or quota, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if (isinstance(error, OSError) and error.errno in NO_SPACE) or "No space left on device" in str(error):
            where = getattr(error, "filename", None) or next(iter(re.findall(r'"(/[^"]+)"', str(error))), None)
            at = f" writing {where}" if where else ""
            return (f"no space left on the device{at}; free space (or use another --workdir or data.cache_dir) and "
                    "run the same command again: a run resumes from its last complete checkpoint")
        error = error.__cause__ or error.__context__
    return None


def fail(message, status: int = 1) -> NoReturn:
    """Prints the one ``error:`` line and exits. Once a tool is working, a single process exits at once
    (``os._exit``): at interpreter exit the threads of Orbax and friends would print after the line. Its
    files are closed by then (the run closes its checkpointer and sinks as the error passes)."""
    stream = sys.stderr.stream if isinstance(sys.stderr, LibraryTracebacks) else sys.stderr
    print(f"error: {message}", file=stream, flush=True)
    if _state["working"] and not distributed.joined():
        sys.stdout.flush()
        os._exit(status)
    sys.exit(status)


def require(**values) -> None:
    """Fails naming every flag that is missing (None or '')."""
    missing = [f"--{k}" for k, v in values.items() if v is None or v == ""]
    if missing:
        raise ConfigError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (see --help)")


def quiet_library_logs() -> None:
    """Only warnings and errors reach the console, and none of Orbax's or gcsfs's: their warnings describe
    their own bookkeeping (a read-only manager, intervals; a bucket's type without credentials), their
    errors come from their threads as tracebacks, and jaxlm reports in one line what failed (--verbose
    shows them)."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = absl_logging.get_absl_handler()
    handler.setLevel(logging.WARNING)
    handler.addFilter(_not_orbax)
    logging.getLogger().setLevel(logging.WARNING)


class LibraryTracebacks:
    """stderr less the tracebacks that library threads print (TensorStore's and asyncio's after a failed
    Orbax save, say): a traceback none of whose frames is jaxlm's goes to the log (the per-process log
    file of a run) instead of the console; jaxlm's own, and everything else, pass as they are."""

    START = "Traceback (most recent call last):"

    def __init__(self, stream):
        self.stream, self.block, self.pending = stream, None, ""
        self.lock = threading.Lock()
        self._routing = threading.local()  # set while this thread hands a traceback to the log

    def write(self, text: str) -> int:
        if getattr(self._routing, "on", False):
            # logging's report that the log could not take a traceback (a full disk): dropped, or its
            # own traceback would reach the console; the run's error line says what failed
            return len(text)
        routed = []
        with self.lock:
            if self.block is None and not self.pending and self.START not in text:
                return self.stream.write(text)
            self.pending += text
            while "\n" in self.pending:
                line, self.pending = self.pending.split("\n", 1)
                if (block := self._line(line + "\n")) is not None:
                    routed.append(block)
        for block in routed:  # to the log outside the lock: its handlers may write to stderr again
            self._routing.on = True
            try:
                logging.getLogger("jaxlm").info("a library thread's traceback (--verbose shows them):\n%s", block)
            finally:
                self._routing.on = False
        return len(text)

    def _line(self, line: str) -> str | None:
        """Passes `line` on, or holds it as part of a traceback; returns a finished library traceback."""
        if self.block is None:
            if line.startswith(self.START):
                self.block = [line]
            else:
                self.stream.write(line)
            return None
        self.block.append(line)
        if not line.startswith((" ", "\t")) and not line.startswith(self.START):  # the exception's own line
            block, self.block = "".join(self.block), None
            if "/jaxlm/" not in block:
                return block
            self.stream.write(block)
        return None

    def flush(self) -> None:
        with self.lock:
            if self.pending and self.block is None:
                self.stream.write(self.pending)
                self.pending = ""
            self.stream.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding, ...: the stream's
        return getattr(self.stream, name)


def _library_thread_exception(args) -> None:
    """An exception that ended a library's thread (TensorBoard's event writer on a full disk, say) goes to
    the log, not the console: the main thread meets the same failure and says it in one line. The
    traceback may show jaxlm's frames (the main thread re-raised the thread's exception object), so the
    stderr filter would let it through; jaxlm's own threads (named jaxlm-*) keep Python's hook."""
    if args.thread is not None and args.thread.name.startswith("jaxlm"):
        return threading.__excepthook__(args)
    logging.getLogger("jaxlm").info("an exception ended the thread %s (--verbose shows them)",
                                    getattr(args.thread, "name", "?"),
                                    exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _not_orbax(record: logging.LogRecord) -> bool:
    return not any(lib in record.pathname for lib in ("orbax", "gcsfs"))


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


def _flag_error(text: str) -> str:
    """absl's message for a flag it could not parse; a --config override whose value is not of its field's
    type in the shape of every config error (``--config.KEY=VALUE: what is wrong; what to do``)."""
    m = re.match(r"flag (--config\.([\w.]+))=(.*?): (?:invalid literal for (int)\(\)|could not convert string to float)",
                 text)
    if not m:
        return f"{text} (see --help)"
    arg, key, value, kind = m.groups()
    example = config_lib.get_by_path(config_lib.schema(), key)
    return f"{arg}={value}: not {'a whole number' if kind == 'int' else 'a number'}; give one, e.g. {arg}={example}"


def _override_arg(argv: list[str]) -> str:
    """The ``--config.*`` argument an ml_collections error is about (best effort)."""
    schema = config_lib.schema()
    for a in argv:  # the first override whose key the schema lacks
        key = a.lstrip("-").split("=", 1)[0]
        missing = config_lib.MISSING
        if key.startswith("config.") and config_lib.get_by_path(schema, key[len("config."):], missing) is missing:
            return a
    return "a --config override"

