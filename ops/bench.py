#!/usr/bin/env python3
"""Benchmark the delivery path against the bare HTTP call (the code is ``worker/bench.py``).

python ops/bench.py --quick
python ops/bench.py --records 20000 --json bench.json
"""

from __future__ import annotations

import sys

from worker.bench import main

if __name__ == "__main__":
    sys.exit(main())
