"""`python -m lprd` is the `lprd` command."""

from lprd.cli import main

raise SystemExit(main())
