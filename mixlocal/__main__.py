"""`python -m mixlocal` is the `mixlocal` command."""
import sys

from mixlocal.engine.cli import main

sys.exit(main())
