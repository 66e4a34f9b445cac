"""``python -m modelfuse.cli``."""

from modelfuse.cli import main

main()
