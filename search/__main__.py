"""``python -m search``: the CLI, as worker processes are started."""

from search.cli import main

main()
