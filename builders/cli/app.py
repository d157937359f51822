"""The `iterdpo` group, the catalog/debug state and the error policy; the commands live beside it (data.py,
stages.py, hub.py, tools.py) and only parse, call a library function, and print.

Error policy (DESIGN.md): a user error is ONE line on stderr and exit 1 (library warnings and progress noise
suppressed); `--debug` shows everything and the traceback; usage errors are Click's own (exit 2).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import click

from builders import __version__

# Read by OpenMP when torch loads (commands import it lazily, after this). Waiting threads sleep instead of spinning:
# on a shared 2-core machine a spinning thread holds a core its partner needs, and 2 threads then ran a DPO step
# 2-7x and a vLLM batch 5x slower than 1 thread (bench/openmp_threads.py); sleeping, 2 threads are as fast or faster.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from builders.cli.options import example, flag_name
from builders.config import CATALOG_ENV, DEFAULT_CATALOG
from builders.errors import IterdpoError, one_line


@dataclass
class State:
    catalog_path: str | None
    debug: bool

    def catalog(self):
        from builders.catalog import Catalog

        return Catalog(self.catalog_path)


def _quiet() -> None:
    """Keep stderr for our own progress and errors: silence library warnings, logs and their progress bars."""
    warnings.simplefilter("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight loading/saving bars too
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # huggingface_hub sets its logger's level when it is imported (after this): its retry lines ("Retrying in 1s")
    # would reach stderr; our own retries report a failure in one line
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    for name in ("datasets", "transformers", "huggingface_hub", "filelock", "urllib3", "fsspec"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from builders.backends import vllm as vllm_backend

    vllm_backend.QUIET = True  # vLLM's C++/Triton start-up warnings bypass Python's warnings and logging


# ------------------------------------------------------------------------------------------------------------ group
@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    epilog=example(
        "iterdpo prompts import data/ultrafeedback_sample.jsonl && iterdpo prompts split --train-size 40 --test-size 10"
    ),
)
@click.option(
    "--catalog",
    "catalog_path",
    type=click.Path(dir_okay=False),
    default=None,
    help=f"Catalog file (DuckDB). Env {CATALOG_ENV}; default {DEFAULT_CATALOG}.",
)
@click.option("--debug", is_flag=True, help="Show library warnings, progress and full tracebacks.")
@click.version_option(__version__, "--version", prog_name="iterdpo")
@click.pass_context
def cli(ctx: click.Context, catalog_path: str | None, debug: bool) -> None:
    """Build, version and publish the preference datasets of iterative DPO.

    Stages: prompts -> generate -> rank -> build (pairs) -> publish -> train; each output is a snapshot in the
    catalog.
    """
    if not debug:
        _quiet()
    ctx.obj = State(catalog_path, debug)


@contextmanager
def stage_output(debug: bool):
    """Around a model-running stage. stdout is kept for the result (vLLM logs to stdout by default: send it to
    stderr). Without --debug, what libraries write below Python (C++ and Triton warnings, worker processes and their
    tracebacks, their progress bars) goes to /dev/null, while our own progress bar and error line keep stderr."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if debug:
        yield
        return
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # worker processes do not inherit our warning filters
    logging.getLogger("vllm").setLevel(logging.ERROR)  # vLLM warns at import, before it applies its log level
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    devnull = os.open(os.devnull, os.O_WRONLY)
    old_stderr = sys.stderr
    real = _has_fd(old_stderr, 2)  # under a test's in-memory capture, sys.stderr is not fd 2: leave it alone
    try:
        if real:
            sys.stderr = open(os.dup(saved[2]), "w", buffering=1, encoding=old_stderr.encoding, errors="replace")
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        if real:  # left open: handlers a library set up meanwhile may still write to it
            sys.stderr = old_stderr
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def debug_flag() -> bool:
    """--debug, for commands that do not take the group's state."""
    state = click.get_current_context().find_root().obj
    return bool(state and state.debug)


def _has_fd(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


# the config field a message names -> the flag the user typed, where the two differ by more than dashes
FLAGS = {"from_refs": "--from", "splits": "--split"}


def in_flags(e: IterdpoError) -> str:
    """The library's message, with the config field it is about named as the CLI's flag (`--num-responses`)."""
    text = str(e)
    if e.option and e.option in text:
        return text.replace(e.option, FLAGS.get(e.option, flag_name(e.option)), 1)
    return text


# ------------------------------------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> None:
    """Console entry point: applies the error policy around the Click group."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="iterdpo", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("Interrupted; finished work is kept in the catalog.", err=True)
        sys.exit(130)
    except IterdpoError as e:
        if debug:
            raise
        click.echo(f"Error: {in_flags(e)}", err=True)
        sys.exit(1)
    except Exception as e:  # a bug or an unexpected library failure: still one line, the traceback on --debug
        if debug:
            raise
        text = one_line(str(e), 1000)
        click.echo(f"Error: unexpected {type(e).__name__}: {text} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)
