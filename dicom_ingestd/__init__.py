"""dicom-ingestd: a durable DICOM C-STORE receiver daemon."""

__version__ = "0.2.0"
