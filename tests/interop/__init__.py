"""Interoperability with independent Storage SCUs (DCMTK, pynetdicom, GDCM, CTN, odil, PixelMed).

See matrix.py for the generator of docs/interop-matrix.md and test_interop.py for the tests.
"""
