"""The Storage SCUs of the matrix, the transfer syntaxes, and how each tool is invoked.

Every sender is an independent implementation installed from Debian or PyPI and run as its own
process, the way an operator would run it; its calling AE title is its own so the daemon's log
can be checked for it.  Each one proposes what it proposes: we only pick the options that make
it propose the file's own transfer syntax where it has such options (DCMTK storescu), and let
it decide everything else (pynetdicom's app with -cx proposes exactly the file's syntax, dcmsend
the file's syntax or the uncompressed ones, CTN, odil and PixelMed choose themselves).
"""

import importlib.metadata
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
CALLED_AE = "STORESCP"
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")


@dataclass(frozen=True)
class Syntax:
    """A transfer syntax and the bundled pydicom file that represents it."""

    key: str
    uid: str
    label: str
    file_name: str

    @property
    def path(self) -> Path:
        return TEST_FILES / self.file_name


# One representative per transfer syntax; MR_small variants where pydicom has one, so most
# rows carry the same object in different encodings.
SYNTAXES: tuple[Syntax, ...] = (
    Syntax("implicit", "1.2.840.10008.1.2", "Implicit VR LE", "MR_small_implicit.dcm"),
    Syntax("explicit-le", "1.2.840.10008.1.2.1", "Explicit VR LE", "CT_small.dcm"),
    Syntax("explicit-be", "1.2.840.10008.1.2.2", "Explicit VR BE", "MR_small_bigendian.dcm"),
    Syntax("deflated", "1.2.840.10008.1.2.1.99", "Deflated Explicit VR LE", "image_dfl.dcm"),
    Syntax("rle", "1.2.840.10008.1.2.5", "RLE Lossless", "MR_small_RLE.dcm"),
    Syntax("jpeg-baseline", "1.2.840.10008.1.2.4.50", "JPEG Baseline (1)",
           "SC_rgb_jpeg_dcmtk.dcm"),
    Syntax("jpeg-extended", "1.2.840.10008.1.2.4.51", "JPEG Extended (2, 4)", "JPEG-lossy.dcm"),
    Syntax("jpeg-lossless", "1.2.840.10008.1.2.4.70", "JPEG Lossless SV1 (14)",
           "SC_rgb_jpeg_gdcm.dcm"),
    Syntax("jpeg-ls", "1.2.840.10008.1.2.4.80", "JPEG-LS Lossless",
           "MR_small_jpeg_ls_lossless.dcm"),
    Syntax("jpeg-ls-near", "1.2.840.10008.1.2.4.81", "JPEG-LS Near-Lossless",
           "JPEGLSNearLossless_16.dcm"),
    Syntax("j2k-lossless", "1.2.840.10008.1.2.4.90", "JPEG 2000 Lossless",
           "MR_small_jp2klossless.dcm"),
    Syntax("j2k", "1.2.840.10008.1.2.4.91", "JPEG 2000", "JPEG2000.dcm"),
)
SYNTAX_BY_UID = {syntax.uid: syntax for syntax in SYNTAXES}

# DCMTK storescu proposes the uncompressed syntaxes unless told otherwise; these options make it
# also propose the file's own syntax (storescu --help: "proposed transmission transfer syntaxes").
STORESCU_PROPOSAL = {
    "implicit": ["-xi"], "explicit-le": ["-xe"], "explicit-be": ["-xb"], "deflated": ["-xd"],
    "rle": ["-xr"], "jpeg-baseline": ["-xy"], "jpeg-extended": ["-xx"],
    "jpeg-lossless": ["-xs"], "jpeg-ls": ["-xt"], "jpeg-ls-near": ["-xu"],
    "j2k-lossless": ["-xv"], "j2k": ["-xw"],
}

Command = Callable[[int, Path], list[str]]


@dataclass(frozen=True)
class Sender:
    """One Storage SCU: how to find it, run it, echo with it, and name its version."""

    key: str
    label: str
    ae_title: str
    packages: tuple[str, ...]  # Debian packages (or "pypi:NAME"), for the install hint/version
    executables: tuple[str, ...]  # what must be on PATH for store (first) and echo
    store: Callable[["Sender", int, Syntax], list[str]]
    echo: Callable[["Sender", int], list[str]] | None
    echo_missing: str = ""  # why there is no C-ECHO, when echo is None
    exit_code_reliable: bool = True
    notes: tuple[str, ...] = field(default=())
    # Several files in one invocation: the command for a directory of them, and what to write
    # to the tool's stdin (PixelMed reads the file names there).  None: the tool takes one file.
    store_many: Callable[["Sender", int, Path], tuple[list[str], str]] | None = None
    unreadable: frozenset[str] = frozenset()  # syntax keys of files it cannot even read

    def unavailable(self) -> str | None:
        """None when the sender can run here, else why not (a skip reason)."""
        missing = [name for name in self.executables if shutil.which(name) is None]
        if self.key == "pixelmed" and not PIXELMED_JAR.exists():
            missing.append(str(PIXELMED_JAR))
        if not missing:
            return None
        debs = " ".join(p for p in self.packages if not p.startswith("pypi:"))
        return (f"{', '.join(missing)} not installed (Debian: {debs}); scripts/test installs "
                "it, and says so when apt-get could not")

    def version(self) -> str:
        parts = []
        for package in self.packages:
            if package.startswith("pypi:"):
                name = package[5:]
                try:
                    parts.append(f"{name} {importlib.metadata.version(name)} (PyPI)")
                except importlib.metadata.PackageNotFoundError:
                    parts.append(f"{name} (not installed)")
                continue
            result = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package],
                                    capture_output=True, text=True, check=False)
            parts.append(f"{package} {result.stdout.strip() or '(not installed)'}")
        return ", ".join(parts)


def _storescu(s: Sender, port: int, syntax: Syntax) -> list[str]:
    return ["storescu", *STORESCU_PROPOSAL[syntax.key], "-aet", s.ae_title, "-aec", CALLED_AE,
            "127.0.0.1", str(port), str(syntax.path)]


def files_in(directory: Path) -> list[str]:
    return [str(p) for p in sorted(directory.iterdir())]


def _storescu_many(s: Sender, port: int, directory: Path) -> tuple[list[str], str]:
    # storescu's default proposal (the uncompressed syntaxes); it converts what it can decode
    # and stops at the first file it cannot send.
    return ["storescu", "-aet", s.ae_title, "-aec", CALLED_AE, "127.0.0.1", str(port),
            *files_in(directory)], ""


def _echoscu(s: Sender, port: int) -> list[str]:
    return ["echoscu", "-aet", s.ae_title, "-aec", CALLED_AE, "127.0.0.1", str(port)]


def _dcmsend(s: Sender, port: int, syntax: Syntax) -> list[str]:
    return ["dcmsend", "-aet", s.ae_title, "-aec", CALLED_AE, "127.0.0.1", str(port),
            str(syntax.path)]


def _dcmsend_many(s: Sender, port: int, directory: Path) -> tuple[list[str], str]:
    return ["dcmsend", "-nh", "-aet", s.ae_title, "-aec", CALLED_AE, "127.0.0.1", str(port),
            *files_in(directory)], ""


def _pynetdicom(app: str) -> list[str]:
    return [sys.executable, "-m", "pynetdicom", app]


def _pynetdicom_store(s: Sender, port: int, syntax: Syntax) -> list[str]:
    return [*_pynetdicom("storescu"), "-aet", s.ae_title, "-aec", CALLED_AE, "-cx",
            "127.0.0.1", str(port), str(syntax.path)]


def _pynetdicom_store_many(s: Sender, port: int, directory: Path) -> tuple[list[str], str]:
    return [*_pynetdicom("storescu"), "-aet", s.ae_title, "-aec", CALLED_AE, "-cx",
            "127.0.0.1", str(port), str(directory)], ""


def _pynetdicom_echo(s: Sender, port: int) -> list[str]:
    return [*_pynetdicom("echoscu"), "-aet", s.ae_title, "-aec", CALLED_AE, "127.0.0.1",
            str(port)]


def _gdcm_store(s: Sender, port: int, syntax: Syntax) -> list[str]:
    return ["gdcmscu", "--store", "--aetitle", s.ae_title, "--call", CALLED_AE, "127.0.0.1",
            str(port), "-i", str(syntax.path)]


def _gdcm_store_many(s: Sender, port: int, directory: Path) -> tuple[list[str], str]:
    inputs = [arg for path in files_in(directory) for arg in ("-i", path)]
    return ["gdcmscu", "--store", "--aetitle", s.ae_title, "--call", CALLED_AE, "127.0.0.1",
            str(port), *inputs], ""


def _gdcm_echo(s: Sender, port: int) -> list[str]:
    return ["gdcmscu", "--echo", "--aetitle", s.ae_title, "--call", CALLED_AE, "127.0.0.1",
            str(port)]


def _ctn_store(s: Sender, port: int, syntax: Syntax) -> list[str]:
    return ["send_image", "-q", "-a", s.ae_title, "-c", CALLED_AE, "127.0.0.1", str(port),
            str(syntax.path)]


def _ctn_store_many(s: Sender, port: int, directory: Path) -> tuple[list[str], str]:
    return ["send_image", "-q", "-a", s.ae_title, "-c", CALLED_AE, "127.0.0.1", str(port),
            *files_in(directory)], ""


def _ctn_echo(s: Sender, port: int) -> list[str]:
    return ["dicom_echo", "-a", s.ae_title, "-c", CALLED_AE, "127.0.0.1", str(port)]


def _odil_store(s: Sender, port: int, syntax: Syntax) -> list[str]:
    return ["odil", "store", "127.0.0.1", str(port), s.ae_title, CALLED_AE, str(syntax.path)]


def _odil_store_many(s: Sender, port: int, directory: Path) -> tuple[list[str], str]:
    return ["odil", "store", "127.0.0.1", str(port), s.ae_title, CALLED_AE,
            *files_in(directory)], ""


def _odil_echo(s: Sender, port: int) -> list[str]:
    return ["odil", "echo", "127.0.0.1", str(port), s.ae_title, CALLED_AE]


def _java(main_class: str) -> list[str]:
    # C1 only: these runs are far too short for C2 to pay off, and start-up dominates.
    return ["java", "-XX:TieredStopAtLevel=1", "-Xshare:auto", "-cp", str(PIXELMED_JAR),
            main_class]


def _pixelmed_store(s: Sender, port: int, syntax: Syntax) -> list[str]:
    # host port their-AE our-AE file (StorageSOPClassSCU.main)
    return [*_java("com.pixelmed.network.StorageSOPClassSCU"), "127.0.0.1", str(port),
            CALLED_AE, s.ae_title, str(syntax.path)]


def _pixelmed_store_many(s: Sender, port: int, directory: Path) -> tuple[list[str], str]:
    # "-" instead of a file: StorageSOPClassSCU reads file names from stdin, one association
    return [*_java("com.pixelmed.network.StorageSOPClassSCU"), "127.0.0.1", str(port),
            CALLED_AE, s.ae_title, "-"], "".join(f"{path}\n" for path in files_in(directory))


def _pixelmed_echo(s: Sender, port: int) -> list[str]:
    # host port their-AE our-AE security: its usage line says "ae_title called_ae_title", but
    # the wire shows the third argument is the called AE title (as for StorageSOPClassSCU).
    return [*_java("com.pixelmed.network.VerificationSOPClassSCU"), "127.0.0.1", str(port),
            CALLED_AE, s.ae_title, "NONSECURE"]


SENDERS: tuple[Sender, ...] = (
    Sender("storescu", "DCMTK storescu", "IT-STORESCU", ("dcmtk",), ("storescu", "echoscu"),
           _storescu, _echoscu, store_many=_storescu_many,
           notes=("storescu is given the -x option that proposes the file's syntax (-xi, -xe, "
                  "-xb, -xd, -xr, -xy, -xx, -xs, -xt, -xu, -xv, -xw); with all files at once, "
                  "its default proposal (uncompressed syntaxes), and it stops at the first file "
                  "it cannot convert. C-ECHO with echoscu.",)),
    Sender("dcmsend", "DCMTK dcmsend", "IT-DCMSEND", ("dcmtk",), ("dcmsend",),
           _dcmsend, None, store_many=_dcmsend_many,
           echo_missing="dcmsend has no C-ECHO; DCMTK's echoscu is in the storescu row",
           notes=("dcmsend proposes each file's own syntax (or the uncompressed ones); "
                  "-nh for several files.",)),
    Sender("pynetdicom", "pynetdicom storescu app", "IT-PYNETDICOM", ("pypi:pynetdicom",),
           (), _pynetdicom_store, _pynetdicom_echo, exit_code_reliable=False,
           store_many=_pynetdicom_store_many,
           notes=("`python -m pynetdicom storescu -cx` (proposes exactly the file's syntax) "
                  "and `echoscu`; the app exits 0 even when a store fails, so only the wire "
                  "counts.",)),
    Sender("gdcm", "GDCM gdcmscu", "IT-GDCMSCU", ("libgdcm-tools",), ("gdcmscu",),
           _gdcm_store, _gdcm_echo, exit_code_reliable=False, store_many=_gdcm_store_many,
           notes=("gdcmscu 3.0.21 aborts (SIGABRT, \"ProtocolStream as nullptr is invalid\") "
                  "after every completed association, against DCMTK storescp too; its exit "
                  "status is ignored and only the wire counts.",)),
    Sender("ctn", "CTN send_image", "IT-CTN", ("ctn",), ("send_image", "dicom_echo"),
           _ctn_store, _ctn_echo, store_many=_ctn_store_many, unreadable=frozenset({"deflated"}),
           notes=("C-ECHO with CTN's dicom_echo. Given several files, send_image fails "
                  "reading its own copy of MR_small_RLE.dcm (\"exportData ... errno: 9\") and "
                  "stops, against DCMTK storescp too; alone, the file goes through. It cannot "
                  "read deflated files at all.",)),
    Sender("odil", "odil", "IT-ODIL", ("odil",), ("odil",), _odil_store, _odil_echo,
           store_many=_odil_store_many, unreadable=frozenset({"deflated"}),
           notes=("`odil store` / `odil echo` (Debian's CLI on /usr/bin/python3). odil "
                  "proposes only Explicit and Implicit VR Little Endian and sends compressed "
                  "data sets unchanged on such a context (⚠ cells): the stored file then says "
                  "Explicit VR LE over encapsulated pixel data, exactly as received. DCMTK "
                  "storescp +B does the same; storescp without +B cannot parse such an object "
                  "and answers 0xA700, storing nothing (dicom-ingestd's default mode stores it "
                  "as received too, see storage.bit_preserving). It cannot read deflated "
                  "files.",)),
    Sender("pixelmed", "PixelMed", "IT-PIXELMED", ("pixelmed-apps", "libpixelmed-java"),
           ("java",), _pixelmed_store, _pixelmed_echo, exit_code_reliable=False,
           store_many=_pixelmed_store_many,
           notes=("com.pixelmed.network.StorageSOPClassSCU and VerificationSOPClassSCU, one JVM "
                  "per file; StorageSOPClassSCU exits 0 whatever happened. Given several files "
                  "(file names on stdin, one association) it chooses the context by SOP class "
                  "and sent some compressed Secondary Capture files, still compressed, on the "
                  "Deflated context (⚠).",)),
)
SENDER_BY_KEY = {sender.key: sender for sender in SENDERS}


def java_version() -> str:
    if shutil.which("java") is None:
        return "java (not installed)"
    result = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False)
    lines = [line for line in (result.stderr + result.stdout).splitlines() if " version " in line]
    return lines[0].strip() if lines else "java (unknown version)"
