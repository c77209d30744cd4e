"""``python -m example_app``: load-test the example under uvicorn (see :mod:`example_app.burst`)."""

import sys

from .burst import main

if __name__ == "__main__":
    sys.exit(main())
