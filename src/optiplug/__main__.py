"""``python -m optiplug``: the same as the ``optiplug`` command."""

from optiplug.app.cli import main

main()
