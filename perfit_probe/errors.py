"""Exceptions raised by perfit-probe.

Every error says what was wrong and how to fix it, in one line. The CLI turns any
``PerfitError`` into that line on stderr and a non-zero exit status, without a traceback.
"""


class PerfitError(Exception):
    """Base class of every error perfit-probe raises on purpose."""


class ModelLoadError(PerfitError):
    """A model could not be found or loaded (missing path, hub id while offline, ...)."""


class SiteError(PerfitError):
    """A site name, layer index or position spec is invalid for the model."""


class DataError(PerfitError):
    """Input data is malformed: names the file, record and field that are wrong."""


class CacheError(PerfitError):
    """An activation cache on disk is missing, corrupt, truncated or inconsistent."""


class ConfigError(PerfitError):
    """A configuration value is invalid (unknown option, rank too large, ...)."""


class ArtifactError(PerfitError):
    """A saved artifact does not match the model or is unreadable."""
