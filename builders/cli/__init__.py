"""The `iterdpo` command line: parses, calls a library function, prints. No logic of its own.

app.py holds the group and the error policy, options.py the options built from the config fields, render.py the
printing; the commands: prompts.py, versions.py, stages.py (generate, rank, build, train, run, quickstart), hub.py
(publish, publish-model), models.py (tiny-models, models import-gguf), evaluation.py (best-of-n, eval) and reward.py (reward train, reward eval).
"""

import builders.cli.evaluation  # noqa: F401
import builders.cli.hub  # noqa: F401
import builders.cli.models  # noqa: F401
import builders.cli.prompts  # noqa: F401  (the command modules register their commands on `cli`)
import builders.cli.reward  # noqa: F401
import builders.cli.stages  # noqa: F401
import builders.cli.versions  # noqa: F401
from builders.cli.app import cli, main

__all__ = ["cli", "main"]
