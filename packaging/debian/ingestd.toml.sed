# The packaged /etc/ingestd.toml is etc/ingestd.toml with the settings of the system
# service uncommented; debian/rules checks that each substitution happened, and
# tests/test_packaging.py that the result is valid and differs from the defaults only there.
/^# Reference: man 5 ingestd.toml$/a\
#\
# Debian: network.port, storage.output_directory and jobs.state_directory are\
# set below for the system service; see dicom-ingestd(8), section SYSTEMD.
s|^#port = 104$|port = 104|
/^port = 104$/i\
# Under systemd the port is ListenStream= of dicom-ingestd.socket; change it there\
# (systemctl edit dicom-ingestd.socket) and here.
s|^#output_directory = "\."$|output_directory = "/var/lib/dicom-ingestd/incoming"|
/^output_directory = /i\
# The state directory of dicom-ingestd.service (StateDirectory=); elsewhere, also\
# allow the service to write there (ReadWritePaths= in systemctl edit dicom-ingestd).
s|^#state_directory = ""$|state_directory = "/var/lib/dicom-ingestd/state"|
/^state_directory = /i\
# Also under the service's StateDirectory=, apart from the received objects.
