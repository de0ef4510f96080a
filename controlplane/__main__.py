"""`python -m controlplane` runs the `tasklane` CLI, for when the script is not on PATH."""

import sys

from controlplane.cli import main

sys.exit(main())
