"""``python -m kimi_hf``: the ``kimi-hf`` command line (see :mod:`kimi_hf.cli`)."""

from kimi_hf.cli import main

raise SystemExit(main())
