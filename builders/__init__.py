"""iterdpo: build, version and publish the preference datasets of iterative DPO.

Stages are plain functions (see builders.prompts, builders.catalog, ...); the CLI in builders.cli only calls them.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("iterdpo")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from builders.errors import IterdpoError  # noqa: E402

__all__ = ["IterdpoError", "__version__"]
