"""python -m libna.bench (see libna.bench)."""

import os
import sys

from .cli import main

if __name__ == "__main__":
    # NumPy's OpenBLAS threads spin and steal cores from the kernels being
    # timed: start again with one OpenBLAS thread unless the caller chose.
    if "OPENBLAS_NUM_THREADS" not in os.environ:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "libna.bench", *sys.argv[1:]])
    sys.exit(main())
