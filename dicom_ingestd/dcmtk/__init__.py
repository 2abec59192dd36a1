"""Data copied from DCMTK, declared once."""
