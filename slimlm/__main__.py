"""`python -m slimlm` runs the CLI."""

import sys
from pathlib import Path

# `python -m` puts the working directory first on sys.path. In a checkout of slimlm that directory holds the source
# folder kernels/, which would hide the `kernels` package transformers imports; slimlm itself is found through its
# installation (the package-dir mapping), so the checkout's root is not needed there.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parents[1]:
    sys.path.pop(0)

from slimlm.cli import main  # noqa: E402

sys.exit(main())
