"""`python -m mixlocal.engine.server`: the server without the rest of the command line."""
import sys

from .app import main

sys.exit(main())
