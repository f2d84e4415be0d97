"""`python -m cosegment IMAGE... --out DIR`: the command-line tool (see :mod:`cosegment.cli`)."""

from .cli import main

raise SystemExit(main())
