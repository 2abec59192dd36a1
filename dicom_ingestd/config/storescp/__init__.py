"""Translate a DCMTK storescp command line into dicom-ingestd TOML.

`translate(argv)` reads a storescp argument list (without the program name) the way storescp
3.6.7 does and returns a `Translation`: the TOML tables to write, warnings for options that have
no meaning here, and `toml()` to render both.  What it emits is meant to be run unchanged by
`dicom-ingestd run` and to behave like the storescp command line did.

storescp's command-line rules, as implemented by DCMTK's OFCommandLine (ofstd/libsrc/ofcmdln.cc)
and storescp.cc, and mirrored here:

* Options and the single parameter (the port) may appear in any order.  An argument is an
  option when it starts with '-' or '+' and is at least two characters long, unless the second
  character is a digit ("-1" is a parameter).  Option values are taken verbatim from the
  following arguments, even when they look like options ("-aet -X" sets the AE title "-X").
* Options are matched exactly, in their short or long spelling; there are no abbreviations and
  no end-of-options marker: "--" is an unknown option, as in storescp.
* When an option is repeated, the rightmost occurrence counts.  Options that select one of
  several alternatives (storescp's "option blocks", e.g. +xe/+xb/+xa or -ss/-su/-sp) are
  mutually exclusive: the rightmost of them wins, the others have no effect at all.
* "@file" arguments are replaced by the file's content before anything else is looked at.  The
  content is split at spaces, tabs and line ends; a single or double quote starts a group that
  runs to the next quote of the same kind (quotes may produce an empty argument, there are no
  escapes).  storescp does not expand "@" inside a command file; we reject such a nested
  command file outright instead of passing "@name" on as a bogus port.
* -h/--help and --version make storescp print text and exit.  They are accepted with a
  warning, and the rest of the command line is translated, so that the result shows what the
  command line would have run; without a port there is nothing to run, and the missing port
  is reported as usual.

Each storescp option (3.6.7, plus the 3.7 options -i4/-i6/-i0, --max-associations and the 3.7
TLS options) has one row in `OPTIONS` (`table`): it sets TOML keys, is ignored with a warning,
or is not implemented yet (an error naming the option).  Conflicts that storescp itself
enforces between options we implement are enforced too (`conflicts`, a table of rules), so a
command line storescp refuses is refused here.

+ac (TCP wrapper access control) is the one option whose translation reads files other than
command files: hosts.allow and hosts.deny (in /etc, or in $DICOM_INGESTD_HOSTS_DIR), at
translation time; see `hosts`.

The modules, in the order a translation uses them: `command_line` (expansion and parsing),
`options` (what a row and a use are), `table` (the rows), `hosts` (+ac), `conflicts`,
`translate` (the values, checked against the schema, as a `Translation`).

Where our defaults differ from storescp's (logging.level, network.disable_host_lookup,
network.max_pdu), the translation sets storescp's value explicitly; network.port,
storage.output_directory and logging.level are always written.  Not so the limits that keep
hostile or stuck peers from holding workers forever (network.dimse_timeout,
workers.max_associations, network.min_transfer_rate): storescp has none by default, and a
command line without -td or --max-associations gets ours.
"""

from dicom_ingestd.config.storescp.hosts import HOSTS_DIR, HOSTS_DIR_ENV
from dicom_ingestd.config.storescp.options import Effect, Kind, Option, Setter, Use
from dicom_ingestd.config.storescp.table import OPTIONS, find_option
from dicom_ingestd.config.storescp.translate import Translation, translate

__all__ = [
    "HOSTS_DIR", "HOSTS_DIR_ENV", "OPTIONS", "Effect", "Kind", "Option", "Setter", "Translation",
    "Use", "find_option", "translate",
]
