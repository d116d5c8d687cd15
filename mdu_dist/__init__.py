from importlib.metadata import version as _v, PackageNotFoundError
try:
    __version__ = _v("mdu-dist")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+local"
