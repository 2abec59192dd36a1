"""A storage commitment report job: ``python3 -I .../deliver_job.py ID.rep``.

Run by the job runner as a process of its own (jobs/commitment.py queues it).  Isolated
(-I), so the package and its dependencies come from DICOM_INGESTD_PATH, which the master
sets to where they are installed; then commitment/deliver.py does the work.
"""

import os
import sys

if __name__ == "__main__":
    sys.path[:0] = [p for p in os.environ.get("DICOM_INGESTD_PATH", "").split(os.pathsep) if p]
    from dicom_ingestd.commitment.deliver import main

    sys.exit(main(sys.argv[1:]))
