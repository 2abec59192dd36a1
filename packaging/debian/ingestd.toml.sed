# /usr/share/doc/dicom-ingestd/examples/ingestd.toml, the complete reference, is
# etc/ingestd.toml with the settings of the packaged /etc/ingestd.toml (debian/ingestd.toml)
# uncommented; debian/rules checks that each substitution happened, and
# tests/test_packaging.py that the result is valid and says what the conffile says.
/^# Reference: man 5 ingestd.toml$/a\
#\
# Debian: this is the complete reference; the file dicom-ingestd reads is\
# /etc/ingestd.toml, which sets only network.port, storage.output_directory and\
# jobs.state_directory (uncommented below). Copy the keys you need there.
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
