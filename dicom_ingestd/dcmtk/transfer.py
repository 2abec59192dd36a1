"""Transfer syntaxes: the UIDs we name (PS3.5 A, PS3.6 A) and storescp 3.6.7's preference lists.

A leaf (stdlib only), and data taken from DCMTK (storescp.cc's "preferred network transfer
syntaxes" options): configuration, negotiation and the encoders all read it here.

``PREFERENCES[key]`` is the ordered transfer-syntax list storescp builds for one of those
options; ``STORESCP_PREFERENCE_FLAGS[key]`` is the option's short and long flag.  The order *is*
the preference: an acceptor takes, per proposed presentation context, the first transfer syntax
of its own list that the requestor proposed (worker/negotiation.py).

Host byte order: storescp puts the *local* explicit VR byte order first for ``+x=`` and ``+xa``.
We run on little-endian hosts, so those lists are encoded as a little-endian storescp builds
them (explicit VR little endian before explicit VR big endian).

Preference lists (``LE``/``BE`` = explicit VR little/big endian, ``IMPL`` = implicit VR LE;
numbers abbreviate ``1.2.840.10008.1.2.4.N``)::

    uncompressed +x=  LE BE IMPL               mpeg2        +xm  .100 LE BE IMPL
    little       +xe  LE BE IMPL               mpeg2-high   +xh  .101 LE BE IMPL
    big          +xb  BE LE IMPL               mpeg4        +xn  .102 LE BE IMPL
    lossless     +xs  .70 LE BE IMPL           mpeg4-bd     +xl  .103 LE BE IMPL
    jpeg8        +xy  .50 LE BE IMPL           mpeg4-2-2d   +x2  .104 LE BE IMPL
    jpeg12       +xx  .51 LE BE IMPL           mpeg4-2-3d   +x3  .105 LE BE IMPL
    j2k-lossless +xv  .90 LE BE IMPL           mpeg4-2-st   +xo  .106 LE BE IMPL
    j2k-lossy    +xw  .91 LE BE IMPL           hevc         +x4  .107 LE BE IMPL
    jls-lossless +xt  .80 LE BE IMPL           hevc10       +x5  .108 LE BE IMPL
    jls-lossy    +xu  .81 LE BE IMPL           rle          +xr  RLE LE BE IMPL
    deflated     +xd  DEFLATE LE BE IMPL       implicit     +xi  IMPL
    all          +xa  .91 .90 .51 .50 .70 .81 .80 RLE .100 .101 .102 .103 .104 .105 .106
                      .107 .108 DEFLATE LE BE IMPL
"""

from typing import Final

# -- transfer syntaxes (PS3.5 A / PS3.6 A) ------------------------------------------------------
IMPLICIT_LE: Final = "1.2.840.10008.1.2"
EXPLICIT_LE: Final = "1.2.840.10008.1.2.1"
DEFLATED_LE: Final = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE: Final = "1.2.840.10008.1.2.2"
JPEG_BASELINE: Final = "1.2.840.10008.1.2.4.50"  # process 1, 8 bit lossy
JPEG_EXTENDED: Final = "1.2.840.10008.1.2.4.51"  # process 2 & 4, 12 bit lossy
JPEG_LOSSLESS_SV1: Final = "1.2.840.10008.1.2.4.70"  # process 14, selection value 1
JPEG_LS_LOSSLESS: Final = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR_LOSSLESS: Final = "1.2.840.10008.1.2.4.81"
JPEG_2000_LOSSLESS: Final = "1.2.840.10008.1.2.4.90"
JPEG_2000: Final = "1.2.840.10008.1.2.4.91"
MPEG2_MPML: Final = "1.2.840.10008.1.2.4.100"
MPEG2_MPHL: Final = "1.2.840.10008.1.2.4.101"
MPEG4_HP41: Final = "1.2.840.10008.1.2.4.102"
MPEG4_HP41_BD: Final = "1.2.840.10008.1.2.4.103"
MPEG4_HP42_2D: Final = "1.2.840.10008.1.2.4.104"
MPEG4_HP42_3D: Final = "1.2.840.10008.1.2.4.105"
MPEG4_HP42_STEREO: Final = "1.2.840.10008.1.2.4.106"
HEVC_MP51: Final = "1.2.840.10008.1.2.4.107"
HEVC_M10P51: Final = "1.2.840.10008.1.2.4.108"
RLE_LOSSLESS: Final = "1.2.840.10008.1.2.5"

# Every option that prefers one (compressed or deflated) syntax falls back to the three
# uncompressed ones in this fixed order, little endian first whatever the host.
_FALLBACK: Final = (EXPLICIT_LE, EXPLICIT_BE, IMPLICIT_LE)

PREFERENCES: Final[dict[str, tuple[str, ...]]] = {
    # +x= (default): local byte order first; on a little-endian host the same as +xe.
    "uncompressed": (EXPLICIT_LE, EXPLICIT_BE, IMPLICIT_LE),
    "little": (EXPLICIT_LE, EXPLICIT_BE, IMPLICIT_LE),
    "big": (EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE),
    "lossless": (JPEG_LOSSLESS_SV1, *_FALLBACK),
    "jpeg8": (JPEG_BASELINE, *_FALLBACK),
    "jpeg12": (JPEG_EXTENDED, *_FALLBACK),
    "j2k-lossless": (JPEG_2000_LOSSLESS, *_FALLBACK),
    "j2k-lossy": (JPEG_2000, *_FALLBACK),
    "jls-lossless": (JPEG_LS_LOSSLESS, *_FALLBACK),
    "jls-lossy": (JPEG_LS_NEAR_LOSSLESS, *_FALLBACK),
    "mpeg2": (MPEG2_MPML, *_FALLBACK),
    "mpeg2-high": (MPEG2_MPHL, *_FALLBACK),
    "mpeg4": (MPEG4_HP41, *_FALLBACK),
    "mpeg4-bd": (MPEG4_HP41_BD, *_FALLBACK),
    "mpeg4-2-2d": (MPEG4_HP42_2D, *_FALLBACK),
    "mpeg4-2-3d": (MPEG4_HP42_3D, *_FALLBACK),
    "mpeg4-2-st": (MPEG4_HP42_STEREO, *_FALLBACK),
    "hevc": (HEVC_MP51, *_FALLBACK),
    "hevc10": (HEVC_M10P51, *_FALLBACK),
    "rle": (RLE_LOSSLESS, *_FALLBACK),
    "deflated": (DEFLATED_LE, *_FALLBACK),
    # +xi: the only option that drops the explicit syntaxes.
    "implicit": (IMPLICIT_LE,),
    # +xa: lossy JPEG 2000 first and JPEG lossless only fifth -- storescp's order, not a
    # quality ranking; explicit LE before BE is again the local byte order.
    "all": (
        JPEG_2000, JPEG_2000_LOSSLESS, JPEG_EXTENDED, JPEG_BASELINE, JPEG_LOSSLESS_SV1,
        JPEG_LS_NEAR_LOSSLESS, JPEG_LS_LOSSLESS, RLE_LOSSLESS,
        MPEG2_MPML, MPEG2_MPHL, MPEG4_HP41, MPEG4_HP41_BD, MPEG4_HP42_2D, MPEG4_HP42_3D,
        MPEG4_HP42_STEREO, HEVC_MP51, HEVC_M10P51,
        DEFLATED_LE, EXPLICIT_LE, EXPLICIT_BE, IMPLICIT_LE,
    ),
}

DEFAULT_PREFERENCE: Final = "uncompressed"

STORESCP_PREFERENCE_FLAGS: Final[dict[str, tuple[str, str]]] = {
    # preference key: (storescp's short flag, its long flag)
    "uncompressed": ("+x=", "--prefer-uncompr"),
    "little": ("+xe", "--prefer-little"),
    "big": ("+xb", "--prefer-big"),
    "lossless": ("+xs", "--prefer-lossless"),
    "jpeg8": ("+xy", "--prefer-jpeg8"),
    "jpeg12": ("+xx", "--prefer-jpeg12"),
    "j2k-lossless": ("+xv", "--prefer-j2k-lossless"),
    "j2k-lossy": ("+xw", "--prefer-j2k-lossy"),
    "jls-lossless": ("+xt", "--prefer-jls-lossless"),
    "jls-lossy": ("+xu", "--prefer-jls-lossy"),
    "mpeg2": ("+xm", "--prefer-mpeg2"),
    "mpeg2-high": ("+xh", "--prefer-mpeg2-high"),
    "mpeg4": ("+xn", "--prefer-mpeg4"),
    "mpeg4-bd": ("+xl", "--prefer-mpeg4-bd"),
    "mpeg4-2-2d": ("+x2", "--prefer-mpeg4-2-2d"),
    "mpeg4-2-3d": ("+x3", "--prefer-mpeg4-2-3d"),
    "mpeg4-2-st": ("+xo", "--prefer-mpeg4-2-st"),
    "hevc": ("+x4", "--prefer-hevc"),
    "hevc10": ("+x5", "--prefer-hevc10"),
    "rle": ("+xr", "--prefer-rle"),
    "deflated": ("+xd", "--prefer-deflated"),
    "implicit": ("+xi", "--implicit"),
    "all": ("+xa", "--accept-all"),
}

STORESCP_FLAG_TO_PREFERENCE: Final[dict[str, str]] = {
    flag: key for key, flags in STORESCP_PREFERENCE_FLAGS.items() for flag in flags
}
