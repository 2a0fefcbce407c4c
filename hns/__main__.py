"""``python -m hns``: hnsctl."""

from hns.cli import main

raise SystemExit(main())
