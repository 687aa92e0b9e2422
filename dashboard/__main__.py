"""``python -m dashboard --logdir runs``: the same as the ``stability-dashboard`` command."""

from dashboard.cli import main

raise SystemExit(main())
