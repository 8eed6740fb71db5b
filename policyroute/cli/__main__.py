"""`python -m policyroute.cli`: the `policyroute` command."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())
