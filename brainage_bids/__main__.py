"""Allow ``python -m brainage_bids``."""

import sys

from brainage_bids.cli.run import main

if __name__ == "__main__":
    sys.exit(main())
