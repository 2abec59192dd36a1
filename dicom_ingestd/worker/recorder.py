"""A worker's side of the event path: what happens to a stored object besides its file.

`record` runs after the object is placed and before its response: with [events] configured it
appends the object's record to the outbox and makes it durable, so that a success status
always has a durable event record behind it; it raises StorageError (0xA700) when it cannot,
and the session then withdraws the object and answers the failure.  It also tells the master
(one small datagram, a statistic and a wake-up).  `after_response` is events.exec_sync: the
association waits, a bounded time, until the master says the object's jobs are finished.
"""

import itertools
import logging
import os
import time

from dicom_ingestd import ipc, outbox
from dicom_ingestd.codes import Ending, Status
from dicom_ingestd.errors import StorageError
from dicom_ingestd.outbox import StoredObject

log = logging.getLogger("dicom_ingestd.association")


class Recorder:
    """One association's recorder (see the module docstring).

    `association` is the master's unique key of the association; `writer` is None when no
    event is configured, `link` is set with events.exec_sync.
    """

    def __init__(self, channel: ipc.Channel | None, association: str,
                 writer: outbox.Writer | None = None, link: ipc.SyncWait | None = None,
                 sync_timeout: float = 0.0) -> None:
        self.channel = channel
        self.association = association
        self.writer = writer
        self.link = link
        self.sync_timeout = sync_timeout
        self._numbers = itertools.count(1)
        self._last = ""  # id of the latest record, for after_response

    @property
    def outbox_fd(self) -> int:
        """The outbox directory, or -1 when the master keeps none."""
        return self.writer.directory_fd if self.writer is not None else -1

    def note(self, message: ipc.CommitmentNote) -> None:
        """Tell the master about a storage commitment request (a wake-up, see ipc)."""
        if self.channel is not None:
            self.channel.send(message)

    def record(self, obj: StoredObject) -> None:
        """Make the object's event record durable; raise StorageError when that fails."""
        if self.writer is not None:
            self._last = f"{self.association}-{next(self._numbers)}"
            record = outbox.ObjectRecord.of(obj, self._last, self.association, time.time())
            try:
                self.writer.append(record)
            except outbox.RecordTooLarge as exc:
                raise StorageError(f"cannot record the object's event record: {exc}",
                                   Status.OUT_OF_RESOURCES) from None
            except OSError as exc:
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise StorageError(f"cannot record the object in the state directory's "
                                   f"outbox: {reason}",
                                   Status.OUT_OF_RESOURCES) from None
        if self.channel is not None:
            self.channel.send(ipc.ObjectStored(self.association, obj.size))

    def after_response(self, obj: StoredObject) -> None:
        """events.exec_sync: wait for the jobs of the object just recorded."""
        if self.link is None or not self._last:
            return
        log.debug("%s: waiting for the jobs of %s (events.exec_sync)", obj.peer,
                  obj.sop_instance_uid)
        outcome = self.link.wait_for(self._last, self.sync_timeout)
        if outcome == "timeout":
            log.warning("%s %s->%s: the jobs of %s did not finish within %g s "
                        "(events.exec_sync_timeout); the association goes on, the jobs stay "
                        "queued", obj.peer, obj.calling_ae, obj.called_ae, obj.sop_instance_uid,
                        self.sync_timeout)
        elif outcome == "gone":
            log.warning("%s %s->%s: the master is gone while waiting for the jobs of %s "
                        "(events.exec_sync); the association goes on, the jobs run when a "
                        "master runs again", obj.peer, obj.calling_ae, obj.called_ae,
                        obj.sop_instance_uid)

    def close(self, how: Ending) -> None:
        """The association ended (`how`: Outcome.how); tell the master how."""
        if self.writer is not None:
            self.writer.close()
        if self.channel is not None:
            self.channel.send(ipc.AssociationEnded(self.association, how is Ending.RELEASED))
