"""``python -m flexkv_store.cli``."""

import sys

from flexkv_store.cli import main

sys.exit(main())
