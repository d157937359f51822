"""The launcher of distributed training: `accelerate launch -m train.dpo [--catalog PATH] [--debug] ARGS` runs
`iterdpo [--catalog PATH] [--debug] train ARGS` in every process. The training itself is builders/train.py
(nothing in builders imports this package).

    accelerate launch --config_file train/accelerate/ddp.yaml -m train.dpo --iteration 1 --recipe R.yaml
"""

from __future__ import annotations

import sys


def argv(args: list[str]) -> list[str]:
    """The CLI's arguments: the global options first (`--catalog PATH`, `--catalog=PATH`, `--debug`), then `train`
    and the rest."""
    head: list[str] = []
    while args:
        if args[0] == "--debug" or args[0].startswith("--catalog="):
            head, args = [*head, args[0]], args[1:]
        elif args[0] == "--catalog" and len(args) > 1:
            head, args = [*head, *args[:2]], args[2:]
        else:
            break
    return [*head, "train", *args]


if __name__ == "__main__":
    from builders.cli import main

    main(argv(sys.argv[1:]))
