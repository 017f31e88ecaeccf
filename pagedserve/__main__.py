"""`python -m pagedserve` is the `pagedserve` command (how `up` starts its children)."""

import sys

from pagedserve.entrypoints.cli import main

sys.exit(main())
