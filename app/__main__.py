"""``python -m app`` is the same as the ``spngd`` command."""

from app.cli import main

raise SystemExit(main())
