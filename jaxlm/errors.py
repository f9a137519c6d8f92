"""Exceptions users see. Every message names the field or file, what was found, and the fix."""


class ConfigError(ValueError):
    """A configuration value that is wrong, unknown or inconsistent with another one."""


class DataError(ValueError):
    """Input data that cannot be used (missing, empty, malformed, too small)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked (missing, incompatible, corrupt)."""
