"""Data taken from DCMTK 3.6.7, declared once: UID names, storage SOP classes, modality codes,
transfer-syntax preference lists.  Leaves (stdlib only); the tests check each table against the
installed DCMTK."""
