"""The `iterdpo` command line: parses, calls a library function, prints. No logic of its own.

app.py holds the group and the error policy, options.py the options built from the config fields, render.py the
printing; the commands are in data.py (prompts, versions), stages.py, hub.py and tools.py.
"""

from builders.cli.app import cli, main
import builders.cli.data  # noqa: F401  (the command modules register their commands on `cli`)
import builders.cli.hub  # noqa: F401
import builders.cli.stages  # noqa: F401
import builders.cli.tools  # noqa: F401

__all__ = ["cli", "main"]
