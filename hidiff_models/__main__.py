"""``python -m hidiff_models``: the ``hidiff`` command."""
import sys

from .cli import main

sys.exit(main())
