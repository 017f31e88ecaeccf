"""`python -m pagedserve` is the `pagedserve` command (how `up` starts its children)."""

import sys

from pagedserve.cli import main

sys.exit(main())
