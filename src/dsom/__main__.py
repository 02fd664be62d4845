"""``python -m dsom ...`` (and ``torchrun ... -m dsom``): the same entry point as the ``dsom`` command."""

import sys

from dsom.cli import main

if __name__ == "__main__":
    sys.exit(main())
