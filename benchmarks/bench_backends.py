"""Deployment backends side by side (torch, bitsandbytes, ONNX Runtime, llama.cpp); the code is
`slimlm.export.bench` (export/bench.py).

Same as `slimlm bench export ARGS`.
"""

import sys

from slimlm.export.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
