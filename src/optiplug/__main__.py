"""``python -m optiplug``: the same as the ``optiplug`` command."""

from optiplug.cli import main

main()
