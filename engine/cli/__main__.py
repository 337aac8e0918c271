"""`python -m mixlocal.engine.cli`: the `mixlocal` command."""
import sys

from .main import main

sys.exit(main())
