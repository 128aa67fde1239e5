"""``python -m pyrovae ...``: the ``pyrovae`` command (:func:`pyrovae.cli.main`)."""

import sys

from .cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
