"""Exceptions users see. Every message names the field or file, what was found, and the fix.

Every CLI turns a :class:`JaxlmError` into one ``error: <message>`` line and a non-zero exit
(``jaxlm.cli``); anything else is a bug and keeps its traceback.
"""


class JaxlmError(Exception):
    """Base of every error a user can fix (a config value, a file, a checkpoint)."""


class ConfigError(JaxlmError, ValueError):
    """A configuration value or flag that is wrong, unknown or inconsistent with another one."""


class DataError(JaxlmError, ValueError):
    """Input data that cannot be used (missing, empty, malformed, too small)."""


class CheckpointError(JaxlmError, RuntimeError):
    """A checkpoint or model directory that cannot be used as asked (missing, incompatible, corrupt)."""
