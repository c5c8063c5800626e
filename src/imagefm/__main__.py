"""``python -m imagefm`` runs the ``imagefm`` command."""

from imagefm.cli import main

main()
