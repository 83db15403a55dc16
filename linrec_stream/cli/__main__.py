"""``python -m linrec_stream.cli ...``: the same command line as the ``linrec-stream`` script."""

import sys

from linrec_stream.cli import main

sys.exit(main())
