"""qrec services: everything that does I/O (bus, config, metrics, the processes and the CLI)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qrec")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"
