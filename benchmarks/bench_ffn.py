"""Fused FFN kernels vs the PyTorch reference and torch.compile; see slimlm/kernels/bench.py (`slimlm bench kernel`)."""
import sys

from slimlm.kernels.bench import main

if __name__ == "__main__":
    sys.exit(main())
