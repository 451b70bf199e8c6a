"""Fused FFN kernels vs the PyTorch reference and torch.compile; the code is
`slimlm.kernels.bench` (kernels/bench.py); the same as `slimlm bench kernel`."""
import sys

from slimlm.kernels.bench import main

if __name__ == "__main__":
    sys.exit(main())
