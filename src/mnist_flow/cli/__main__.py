"""`python -m mnist_flow.cli`."""

import sys

from mnist_flow.cli import main

sys.exit(main())
