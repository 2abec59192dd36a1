"""Interoperability with independent Storage SCUs (DCMTK, pynetdicom, GDCM, CTN, odil, PixelMed).

See matrix.py for the generator of docs/interop-matrix.md and test_interop.py for the tests.
"""

import sys
from pathlib import Path

# The modules here use tests/support like every test; scripts/interop-matrix runs
# `python -m tests.interop.matrix`, without the path pytest gives the tests.
_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
