"""How long a storage commitment report offered on the requesting association waits for its
answer: the worker waits that long (worker/commitment.py) and the master holds the report's
delivery job back as long (jobs/commitment.py), so both sides read it here."""

from dicom_ingestd.config.schema import Config


def answer_wait(config: Config) -> float:
    """Seconds a report sent on the requesting association waits for its answer there:
    same_association_wait, or network.dimse_timeout when that is shorter (a sender that
    waits for its report answers it at once; one that does not must not delay it long)."""
    wait = config.storage_commitment.same_association_wait
    dimse = config.network.dimse_timeout
    return float(min(wait, dimse) if dimse else wait)
