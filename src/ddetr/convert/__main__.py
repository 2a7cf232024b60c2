"""``python -m ddetr.convert {official,hf} IN OUT [key=value ...]``: see ``ddetr.convert.cli``."""

import sys

from ddetr.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
