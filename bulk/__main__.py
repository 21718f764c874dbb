"""``python -m bulk SOURCE --out DIR [--ray auto|ADDRESS] ...``; see bulk/job.py."""

import sys

from bulk.job import main

if __name__ == "__main__":
    sys.exit(main())
