from builders.cli.app import main
from builders.cli import data, hub, stages, tools  # noqa: F401

main()
