"""Errors shared by every layer, in a module that imports nothing of the package (no import cycles)."""


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file, key and value."""
