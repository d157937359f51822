"""The `iterdpo` command line: parses, calls a library function, prints. No logic of its own.

app.py holds the group and the error policy, options.py the options built from the config fields, render.py the
printing; the commands are in data.py (prompts, versions), stages.py, hub.py and tools.py.
"""

from builders.cli.app import cli, main
from builders.cli import data, hub, stages, tools  # noqa: F401  (they register their commands on `cli`)

__all__ = ["cli", "main"]
