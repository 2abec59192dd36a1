"""`python -m dicom_ingestd` runs the command line."""

from dicom_ingestd.cli import main

raise SystemExit(main())
