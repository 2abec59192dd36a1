"""Storage Commitment Push Model (PS3.4 Annex J): the request and report data sets, the
durable spool between workers and the master, and the report delivery job."""
