"""``python -m featx.cli`` runs the command line, as ``python -m featx`` and ``featx`` do."""

from featx.cli import main

main()
