"""`python -m pyinetd` runs the command line."""

from pyinetd.cli import main

raise SystemExit(main())
