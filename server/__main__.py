"""``python -m server``: the `runtime` command line (with `serve`)."""

from server.command import main

main()
