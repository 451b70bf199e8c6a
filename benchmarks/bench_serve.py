"""Load-test OpenAI-compatible servers: `python benchmarks/bench_serve.py URL [URL ...] [options]`.

The same as `slimlm bench serve`; the code lives in `slimlm.serve.bench`.
"""

import sys

from slimlm.serve.bench import main

if __name__ == "__main__":
    sys.exit(main())
