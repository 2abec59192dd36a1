"""Presentation-context negotiation policy, as storescp 3.6.7 does it.

Contract
--------
* ``PREFERENCES[key]`` is the ordered transfer-syntax list storescp 3.6.7 builds for one of its
  "preferred network transfer syntaxes" options (``STORESCP_FLAG_TO_PREFERENCE`` maps each
  short and long flag to the key).  The order *is* the preference: DCMTK's
  ``ASC_acceptContextsWithPreferredTransferSyntaxes`` and pynetdicom's ``negotiate_as_acceptor``
  both accept, per proposed presentation context, the first transfer syntax of the *acceptor's*
  list that the requestor proposed; the requestor's order never matters
  (``choose_transfer_syntax`` is that rule).
* storescp uses one list for everything it accepts: Verification, every SOP class in
  ``dcmAllStorageSOPClassUIDs`` and, with ``-pm``, unknown SOP classes.  ``acceptor_contexts``
  returns Verification plus the union of DCMTK 3.6.7's list and pynetdicom's storage SOP
  classes, each with the chosen list.
* ``-pm`` (promiscuous) in storescp accepts a proposed abstract syntax only if DCMTK has no name
  for the UID (``dcmFindNameOfUID() == NULL``), with the same preference list; known
  non-storage SOP classes (worklist, storage commitment, hanging protocol, ...) are still
  refused.  The set of unknown UIDs can only be known per association, so
  ``promiscuous_contexts_for`` turns the A-ASSOCIATE-RQ's proposals into extra acceptor contexts.

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

Deliberate differences from storescp 3.6.7 (all about *which* SOP classes, never the order):

* The pynetdicom-only storage SOP classes (newer than DCMTK 3.6.7, e.g. Photoacoustic Image
  Storage) are accepted without ``-pm`` too; storescp accepts them only with ``-pm``.
* In promiscuous mode "known" means named by pydicom's UID dictionary *or* by DCMTK 3.6.7, so a
  UID from a newer edition of the standard (a new query SOP class, a newer transfer syntax UID
  used as an abstract syntax) is refused where storescp would accept it; and a proposed abstract
  syntax that is not a UID at all (empty, letters, longer than 64) is refused, not accepted.
"""

import re
from collections.abc import Collection, Iterable, Sequence
from typing import Final, Protocol

from pydicom import config as pydicom_config
from pydicom.uid import UID
from pynetdicom.presentation import AllStoragePresentationContexts

from dicom_ingestd.commitment.dataset import SOP_CLASS as COMMITMENT_UID
from dicom_ingestd.commitment.dataset import TRANSFER_SYNTAXES as COMMITMENT_SYNTAXES

__all__ = [
    "DCMTK_STORAGE_SOP_CLASSES",
    "DEFAULT_PREFERENCE",
    "PREFERENCES",
    "STORAGE_SOP_CLASSES",
    "STORESCP_FLAG_TO_PREFERENCE",
    "VERIFICATION_SOP_CLASS",
    "acceptor_contexts",
    "choose_transfer_syntax",
    "is_unknown_sop_class",
    "preference_list",
    "promiscuous_contexts_for",
]

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

VERIFICATION_SOP_CLASS: Final = "1.2.840.10008.1.1"
COMMITMENT_SOP_CLASS: Final = COMMITMENT_UID
COMMITMENT_TRANSFER_SYNTAXES: Final = COMMITMENT_SYNTAXES

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

STORESCP_FLAG_TO_PREFERENCE: Final[dict[str, str]] = {
    "+x=": "uncompressed", "--prefer-uncompr": "uncompressed",
    "+xe": "little", "--prefer-little": "little",
    "+xb": "big", "--prefer-big": "big",
    "+xs": "lossless", "--prefer-lossless": "lossless",
    "+xy": "jpeg8", "--prefer-jpeg8": "jpeg8",
    "+xx": "jpeg12", "--prefer-jpeg12": "jpeg12",
    "+xv": "j2k-lossless", "--prefer-j2k-lossless": "j2k-lossless",
    "+xw": "j2k-lossy", "--prefer-j2k-lossy": "j2k-lossy",
    "+xt": "jls-lossless", "--prefer-jls-lossless": "jls-lossless",
    "+xu": "jls-lossy", "--prefer-jls-lossy": "jls-lossy",
    "+xm": "mpeg2", "--prefer-mpeg2": "mpeg2",
    "+xh": "mpeg2-high", "--prefer-mpeg2-high": "mpeg2-high",
    "+xn": "mpeg4", "--prefer-mpeg4": "mpeg4",
    "+xl": "mpeg4-bd", "--prefer-mpeg4-bd": "mpeg4-bd",
    "+x2": "mpeg4-2-2d", "--prefer-mpeg4-2-2d": "mpeg4-2-2d",
    "+x3": "mpeg4-2-3d", "--prefer-mpeg4-2-3d": "mpeg4-2-3d",
    "+xo": "mpeg4-2-st", "--prefer-mpeg4-2-st": "mpeg4-2-st",
    "+x4": "hevc", "--prefer-hevc": "hevc",
    "+x5": "hevc10", "--prefer-hevc10": "hevc10",
    "+xr": "rle", "--prefer-rle": "rle",
    "+xd": "deflated", "--prefer-deflated": "deflated",
    "+xi": "implicit", "--implicit": "implicit",
    "+xa": "all", "--accept-all": "all",
}

# -- SOP classes ---------------------------------------------------------------------------------
# DCMTK 3.6.7 dcmAllStorageSOPClassUIDs (dcmdata/libsrc/dcuid.cc), in its order: the Storage SOP
# classes storescp accepts.  It deliberately leaves out the "non-patient" ones (Hanging
# Protocol, Color Palette, Implant Templates, ...), which storescp therefore refuses, -pm or not.
DCMTK_STORAGE_SOP_CLASSES: Final[tuple[str, ...]] = (
    "1.2.840.10008.5.1.4.1.1.88.71",    # AcquisitionContextSRStorage
    "1.2.840.10008.5.1.4.1.1.11.8",     # AdvancedBlendingPresentationStateStorage
    "1.2.840.10008.5.1.4.1.1.9.1.3",    # AmbulatoryECGWaveformStorage
    "1.2.840.10008.5.1.4.1.1.9.5.1",    # ArterialPulseWaveformStorage
    "1.2.840.10008.5.1.4.1.1.78.2",     # AutorefractionMeasurementsStorage
    "1.2.840.10008.5.1.4.1.1.131",      # BasicStructuredDisplayStorage
    "1.2.840.10008.5.1.4.1.1.88.11",    # BasicTextSRStorage
    "1.2.840.10008.5.1.4.1.1.9.4.1",    # BasicVoiceAudioWaveformStorage
    "1.2.840.10008.5.1.4.1.1.11.4",     # BlendingSoftcopyPresentationStateStorage
    "1.2.840.10008.5.1.4.1.1.9.8.1",    # BodyPositionWaveformStorage
    "1.2.840.10008.5.1.4.1.1.13.1.4",   # BreastProjectionXRayImageStorageForPresentation
    "1.2.840.10008.5.1.4.1.1.13.1.5",   # BreastProjectionXRayImageStorageForProcessing
    "1.2.840.10008.5.1.4.1.1.13.1.3",   # BreastTomosynthesisImageStorage
    "1.2.840.10008.5.1.4.1.1.9.3.1",    # CardiacElectrophysiologyWaveformStorage
    "1.2.840.10008.5.1.4.1.1.481.19",   # CArmPhotonElectronRadiationRecordStorage
    "1.2.840.10008.5.1.4.1.1.481.13",   # CArmPhotonElectronRadiationStorage
    "1.2.840.10008.5.1.4.1.1.88.65",    # ChestCADSRStorage
    "1.2.840.10008.5.1.4.1.1.88.69",    # ColonCADSRStorage
    "1.2.840.10008.5.1.4.1.1.11.2",     # ColorSoftcopyPresentationStateStorage
    "1.2.840.10008.5.1.4.1.1.11.7",     # CompositingPlanarMPRVolumetricPresentationStateStorage
    "1.2.840.10008.5.1.4.1.1.88.34",    # Comprehensive3DSRStorage
    "1.2.840.10008.5.1.4.1.1.88.33",    # ComprehensiveSRStorage
    "1.2.840.10008.5.1.4.1.1.1",        # ComputedRadiographyImageStorage
    "1.2.840.10008.5.1.4.1.1.90.1",     # ContentAssessmentResultsStorage
    "1.2.840.10008.5.1.4.1.1.82.1",     # CornealTopographyMapStorage
    "1.2.840.10008.5.1.4.1.1.2",        # CTImageStorage
    "1.2.840.10008.5.1.4.1.1.200.2",    # CTPerformedProcedureProtocolStorage
    "1.2.840.10008.5.1.4.1.1.66.3",     # DeformableSpatialRegistrationStorage
    "1.2.840.10008.5.1.4.1.1.77.1.7",   # DermoscopicPhotographyImageStorage
    "1.2.840.10008.5.1.4.1.1.1.3",      # DigitalIntraOralXRayImageStorageForPresentation
    "1.2.840.10008.5.1.4.1.1.1.3.1",    # DigitalIntraOralXRayImageStorageForProcessing
    "1.2.840.10008.5.1.4.1.1.1.2",      # DigitalMammographyXRayImageStorageForPresentation
    "1.2.840.10008.5.1.4.1.1.1.2.1",    # DigitalMammographyXRayImageStorageForProcessing
    "1.2.840.10008.5.1.4.1.1.1.1",      # DigitalXRayImageStorageForPresentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",    # DigitalXRayImageStorageForProcessing
    "1.2.840.10008.5.1.4.1.1.9.7.2",    # ElectromyogramWaveformStorage
    "1.2.840.10008.5.1.4.1.1.9.7.3",    # ElectrooculogramWaveformStorage
    "1.2.840.10008.5.1.4.1.1.104.2",    # EncapsulatedCDAStorage
    "1.2.840.10008.5.1.4.1.1.104.5",    # EncapsulatedMTLStorage
    "1.2.840.10008.5.1.4.1.1.104.4",    # EncapsulatedOBJStorage
    "1.2.840.10008.5.1.4.1.1.104.1",    # EncapsulatedPDFStorage
    "1.2.840.10008.5.1.4.1.1.104.3",    # EncapsulatedSTLStorage
    "1.2.840.10008.5.1.4.1.1.2.1",      # EnhancedCTImageStorage
    "1.2.840.10008.5.1.4.1.1.4.3",      # EnhancedMRColorImageStorage
    "1.2.840.10008.5.1.4.1.1.4.1",      # EnhancedMRImageStorage
    "1.2.840.10008.5.1.4.1.1.130",      # EnhancedPETImageStorage
    "1.2.840.10008.5.1.4.1.1.88.22",    # EnhancedSRStorage
    "1.2.840.10008.5.1.4.1.1.6.2",      # EnhancedUSVolumeStorage
    "1.2.840.10008.5.1.4.1.1.12.1.1",   # EnhancedXAImageStorage
    "1.2.840.10008.5.1.4.1.1.88.76",    # EnhancedXRayRadiationDoseSRStorage
    "1.2.840.10008.5.1.4.1.1.12.2.1",   # EnhancedXRFImageStorage
    "1.2.840.10008.5.1.4.1.1.88.35",    # ExtensibleSRStorage
    "1.2.840.10008.5.1.4.1.1.9.4.2",    # GeneralAudioWaveformStorage
    "1.2.840.10008.5.1.4.1.1.9.1.2",    # GeneralECGWaveformStorage
    "1.2.840.10008.5.1.4.1.1.11.6",     # GrayscalePlanarMPRVolumetricPresentationStateStorage
    "1.2.840.10008.5.1.4.1.1.11.1",     # GrayscaleSoftcopyPresentationStateStorage
    "1.2.840.10008.5.1.4.1.1.9.2.1",    # HemodynamicWaveformStorage
    "1.2.840.10008.5.1.4.1.1.88.70",    # ImplantationPlanSRDocumentStorage
    "1.2.840.10008.5.1.4.1.1.78.8",     # IntraocularLensCalculationsStorage
    "1.2.840.10008.5.1.4.1.1.14.1",     # IntravascularOCTImageStorageForPresentation
    "1.2.840.10008.5.1.4.1.1.14.2",     # IntravascularOCTImageStorageForProcessing
    "1.2.840.10008.5.1.4.1.1.78.3",     # KeratometryMeasurementsStorage
    "1.2.840.10008.5.1.4.1.1.88.59",    # KeyObjectSelectionDocumentStorage
    "1.2.840.10008.5.1.4.1.1.2.2",      # LegacyConvertedEnhancedCTImageStorage
    "1.2.840.10008.5.1.4.1.1.4.4",      # LegacyConvertedEnhancedMRImageStorage
    "1.2.840.10008.5.1.4.1.1.128.1",    # LegacyConvertedEnhancedPETImageStorage
    "1.2.840.10008.5.1.4.1.1.78.1",     # LensometryMeasurementsStorage
    "1.2.840.10008.5.1.4.1.1.79.1",     # MacularGridThicknessAndVolumeReportStorage
    "1.2.840.10008.5.1.4.1.1.88.50",    # MammographyCADSRStorage
    "1.2.840.10008.5.1.4.1.1.91.1",     # MicroscopyBulkSimpleAnnotationsStorage
    "1.2.840.10008.5.1.4.1.1.4",        # MRImageStorage
    "1.2.840.10008.5.1.4.1.1.4.2",      # MRSpectroscopyStorage
    "1.2.840.10008.5.1.4.1.1.9.6.2",    # MultichannelRespiratoryWaveformStorage
    "1.2.840.10008.5.1.4.1.1.7.2",      # MultiframeGrayscaleByteSecondaryCaptureImageStorage
    "1.2.840.10008.5.1.4.1.1.7.3",      # MultiframeGrayscaleWordSecondaryCaptureImageStorage
    "1.2.840.10008.5.1.4.1.1.7.1",      # MultiframeSingleBitSecondaryCaptureImageStorage
    "1.2.840.10008.5.1.4.1.1.7.4",      # MultiframeTrueColorSecondaryCaptureImageStorage
    "1.2.840.10008.5.1.4.1.1.11.11",    # MultipleVolumeRenderingVolumetricPresentationStateStorage
    "1.2.840.10008.5.1.4.1.1.20",       # NuclearMedicineImageStorage
    "1.2.840.10008.5.1.4.1.1.78.7",     # OphthalmicAxialMeasurementsStorage
    "1.2.840.10008.5.1.4.1.1.77.1.5.8",  # OphthalmicOCTBscanVolumeAnalysisStorage
    "1.2.840.10008.5.1.4.1.1.77.1.5.7",  # OphthalmicOpticalCoherenceTomographyEnFace
    "1.2.840.10008.5.1.4.1.1.77.1.5.2",  # OphthalmicPhotography16Bit
    "1.2.840.10008.5.1.4.1.1.77.1.5.1",  # OphthalmicPhotography8Bit
    "1.2.840.10008.5.1.4.1.1.81.1",     # OphthalmicThicknessMapStorage
    "1.2.840.10008.5.1.4.1.1.77.1.5.4",  # OphthalmicTomography
    "1.2.840.10008.5.1.4.1.1.80.1",     # OphthalmicVisualFieldStaticPerimetryMeasurementsStorage
    "1.2.840.10008.5.1.4.1.1.30",       # ParametricMapStorage
    "1.2.840.10008.5.1.4.1.1.88.73",    # PatientRadiationDoseSRStorage
    "1.2.840.10008.5.1.4.1.1.88.75",    # PerformedImagingAgentAdministrationSRStorage
    "1.2.840.10008.5.1.4.1.1.88.74",    # PlannedImagingAgentAdministrationSRStorage
    "1.2.840.10008.5.1.4.1.1.128",      # PositronEmissionTomographyImageStorage
    "1.2.840.10008.5.1.4.1.1.88.40",    # ProcedureLogStorage
    "1.2.840.10008.5.1.4.1.1.11.3",     # PseudoColorSoftcopyPresentationStateStorage
    "1.2.840.10008.5.1.4.1.1.88.68",    # RadiopharmaceuticalRadiationDoseSRStorage
    "1.2.840.10008.5.1.4.1.1.66",       # RawDataStorage
    "1.2.840.10008.5.1.4.1.1.67",       # RealWorldValueMappingStorage
    "1.2.840.10008.5.1.4.1.1.9.6.1",    # RespiratoryWaveformStorage
    "1.2.840.10008.5.1.4.1.1.481.15",   # RoboticArmRadiationStorage
    "1.2.840.10008.5.1.4.1.1.481.20",   # RoboticRadiationRecordStorage
    "1.2.840.10008.5.1.4.1.1.9.7.1",    # RoutineScalpElectroencephalogramWaveformStorage
    "1.2.840.10008.5.1.4.34.7",         # RTBeamsDeliveryInstructionStorage
    "1.2.840.10008.5.1.4.1.1.481.4",    # RTBeamsTreatmentRecordStorage
    "1.2.840.10008.5.1.4.34.10",        # RTBrachyApplicationSetupDeliveryInstructionStorage
    "1.2.840.10008.5.1.4.1.1.481.6",    # RTBrachyTreatmentRecordStorage
    "1.2.840.10008.5.1.4.1.1.481.2",    # RTDoseStorage
    "1.2.840.10008.5.1.4.1.1.481.1",    # RTImageStorage
    "1.2.840.10008.5.1.4.1.1.481.9",    # RTIonBeamsTreatmentRecordStorage
    "1.2.840.10008.5.1.4.1.1.481.8",    # RTIonPlanStorage
    "1.2.840.10008.5.1.4.1.1.481.10",   # RTPhysicianIntentStorage
    "1.2.840.10008.5.1.4.1.1.481.5",    # RTPlanStorage
    "1.2.840.10008.5.1.4.1.1.481.16",   # RTRadiationRecordSetStorage
    "1.2.840.10008.5.1.4.1.1.481.17",   # RTRadiationSalvageRecordStorage
    "1.2.840.10008.5.1.4.1.1.481.21",   # RTRadiationSetDeliveryInstructionStorage
    "1.2.840.10008.5.1.4.1.1.481.12",   # RTRadiationSetStorage
    "1.2.840.10008.5.1.4.1.1.481.11",   # RTSegmentAnnotationStorage
    "1.2.840.10008.5.1.4.1.1.481.3",    # RTStructureSetStorage
    "1.2.840.10008.5.1.4.1.1.481.22",   # RTTreatmentPreparationStorage
    "1.2.840.10008.5.1.4.1.1.481.7",    # RTTreatmentSummaryRecordStorage
    "1.2.840.10008.5.1.4.1.1.7",        # SecondaryCaptureImageStorage
    "1.2.840.10008.5.1.4.1.1.66.4",     # SegmentationStorage
    "1.2.840.10008.5.1.4.1.1.11.10",    # SegmentedVolumeRenderingVolumetricPresentationStateStorage
    "1.2.840.10008.5.1.4.1.1.88.72",    # SimplifiedAdultEchoSRStorage
    "1.2.840.10008.5.1.4.1.1.9.7.4",    # SleepElectroencephalogramWaveformStorage
    "1.2.840.10008.5.1.4.1.1.66.2",     # SpatialFiducialsStorage
    "1.2.840.10008.5.1.4.1.1.66.1",     # SpatialRegistrationStorage
    "1.2.840.10008.5.1.4.1.1.78.6",     # SpectaclePrescriptionReportStorage
    "1.2.840.10008.5.1.4.1.1.77.1.5.3",  # StereometricRelationshipStorage
    "1.2.840.10008.5.1.4.1.1.78.4",     # SubjectiveRefractionMeasurementsStorage
    "1.2.840.10008.5.1.4.1.1.68.1",     # SurfaceScanMeshStorage
    "1.2.840.10008.5.1.4.1.1.68.2",     # SurfaceScanPointCloudStorage
    "1.2.840.10008.5.1.4.1.1.66.5",     # SurfaceSegmentationStorage
    "1.2.840.10008.5.1.4.1.1.481.18",   # TomotherapeuticRadiationRecordStorage
    "1.2.840.10008.5.1.4.1.1.481.14",   # TomotherapeuticRadiationStorage
    "1.2.840.10008.5.1.4.1.1.66.6",     # TractographyResultsStorage
    "1.2.840.10008.5.1.4.1.1.9.1.1",    # TwelveLeadECGWaveformStorage
    "1.2.840.10008.5.1.4.1.1.6.1",      # UltrasoundImageStorage
    "1.2.840.10008.5.1.4.1.1.3.1",      # UltrasoundMultiframeImageStorage
    "1.2.840.10008.5.1.4.1.1.77.1.1.1",  # VideoEndoscopic
    "1.2.840.10008.5.1.4.1.1.77.1.2.1",  # VideoMicroscopic
    "1.2.840.10008.5.1.4.1.1.77.1.4.1",  # VideoPhotographic
    "1.2.840.10008.5.1.4.1.1.78.5",     # VisualAcuityMeasurementsStorage
    "1.2.840.10008.5.1.4.1.1.77.1.1",   # VLEndoscopicImageStorage
    "1.2.840.10008.5.1.4.1.1.77.1.2",   # VLMicroscopicImageStorage
    "1.2.840.10008.5.1.4.1.1.77.1.4",   # VLPhotographicImageStorage
    "1.2.840.10008.5.1.4.1.1.77.1.3",   # VLSlideCoordinatesMicroscopicImageStorage
    "1.2.840.10008.5.1.4.1.1.77.1.6",   # VLWholeSlideMicroscopyImageStorage
    "1.2.840.10008.5.1.4.1.1.11.9",     # VolumeRenderingVolumetricPresentationStateStorage
    "1.2.840.10008.5.1.4.1.1.77.1.5.5",  # WideFieldOphthalmicPhotoStereographicProjection
    "1.2.840.10008.5.1.4.1.1.77.1.5.6",  # WideFieldOphthalmicPhotography3DCoordinates
    "1.2.840.10008.5.1.4.1.1.200.8",    # XAPerformedProcedureProtocolStorage
    "1.2.840.10008.5.1.4.1.1.11.5",     # XAXRFGrayscaleSoftcopyPresentationStateStorage
    "1.2.840.10008.5.1.4.1.1.13.1.1",   # XRay3DAngiographicImageStorage
    "1.2.840.10008.5.1.4.1.1.13.1.2",   # XRay3DCraniofacialImageStorage
    "1.2.840.10008.5.1.4.1.1.12.1",     # XRayAngiographicImageStorage
    "1.2.840.10008.5.1.4.1.1.88.67",    # XRayRadiationDoseSRStorage
    "1.2.840.10008.5.1.4.1.1.12.2",     # XRayRadiofluoroscopicImageStorage
    "1.2.840.10008.5.1.1.30",           # RETIRED_HardcopyColorImageStorage
    "1.2.840.10008.5.1.1.29",           # RETIRED_HardcopyGrayscaleImageStorage
    "1.2.840.10008.5.1.4.1.1.5",        # RETIRED_NuclearMedicineImageStorage
    "1.2.840.10008.5.1.4.1.1.9",        # RETIRED_StandaloneCurveStorage
    "1.2.840.10008.5.1.4.1.1.10",       # RETIRED_StandaloneModalityLUTStorage
    "1.2.840.10008.5.1.4.1.1.8",        # RETIRED_StandaloneOverlayStorage
    "1.2.840.10008.5.1.4.1.1.129",      # RETIRED_StandalonePETCurveStorage
    "1.2.840.10008.5.1.4.1.1.11",       # RETIRED_StandaloneVOILUTStorage
    "1.2.840.10008.5.1.1.27",           # RETIRED_StoredPrintStorage
    "1.2.840.10008.5.1.4.1.1.6",        # RETIRED_UltrasoundImageStorage
    "1.2.840.10008.5.1.4.1.1.3",        # RETIRED_UltrasoundMultiframeImageStorage
    "1.2.840.10008.5.1.4.1.1.77.1",     # RETIRED_VLImageStorage
    "1.2.840.10008.5.1.4.1.1.77.2",     # RETIRED_VLMultiframeImageStorage
    "1.2.840.10008.5.1.4.1.1.12.3",     # RETIRED_XRayAngiographicBiPlaneImageStorage
    "1.2.840.10008.5.1.4.1.1.88.2",     # DRAFT_SRAudioStorage
    "1.2.840.10008.5.1.4.1.1.88.4",     # DRAFT_SRComprehensiveStorage
    "1.2.840.10008.5.1.4.1.1.88.3",     # DRAFT_SRDetailStorage
    "1.2.840.10008.5.1.4.1.1.88.1",     # DRAFT_SRTextStorage
    "1.2.840.10008.5.1.4.1.1.9.1",      # DRAFT_WaveformStorage
    "1.2.840.10008.5.1.4.34.1",         # DRAFT_RTBeamsDeliveryInstructionStorage
    "1.2.840.10008.5.1.4.1.1.501.1",    # DICOS_CTImageStorage
    "1.2.840.10008.5.1.4.1.1.501.2.1",  # DICOS_DigitalXRayImageStorageForPresentation
    "1.2.840.10008.5.1.4.1.1.501.2.2",  # DICOS_DigitalXRayImageStorageForProcessing
    "1.2.840.10008.5.1.4.1.1.501.3",    # DICOS_ThreatDetectionReportStorage
    "1.2.840.10008.5.1.4.1.1.501.4",    # DICOS_2DAITStorage
    "1.2.840.10008.5.1.4.1.1.501.5",    # DICOS_3DAITStorage
    "1.2.840.10008.5.1.4.1.1.501.6",    # DICOS_QuadrupoleResonanceStorage
    "1.2.840.10008.5.1.4.1.1.601.1",    # DICONDE_EddyCurrentImageStorage
    "1.2.840.10008.5.1.4.1.1.601.2",    # DICONDE_EddyCurrentMultiframeImageStorage
)


def _unique(uids: Iterable[str]) -> tuple[str, ...]:
    """Deduplicate, keeping the first occurrence (a stable order keeps logs and tests stable)."""
    return tuple(dict.fromkeys(uids))


_PYNETDICOM_STORAGE_SOP_CLASSES: Final = _unique(
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts if cx.abstract_syntax
)

STORAGE_SOP_CLASSES: Final[tuple[str, ...]] = _unique(
    (*DCMTK_STORAGE_SOP_CLASSES, *_PYNETDICOM_STORAGE_SOP_CLASSES)
)

_STATIC_ABSTRACT_SYNTAXES: Final = frozenset((VERIFICATION_SOP_CLASS, *STORAGE_SOP_CLASSES))

# UIDs DCMTK 3.6.7's uidNameMap names but pydicom's UID dictionary does not.  storescp -pm
# refuses every UID it can name, so "known" must cover DCMTK's names too; the test suite
# checks this set against the installed DCMTK's libdcmdata (tests/dcmtk_facts.py).
_DCMTK_ONLY_NAMED_UIDS: Final = frozenset({
    "1.2.840.113619.5.2",  # PrivateGE_LEI_WithBigEndianPixelDataTransferSyntax
})

# Lenient on purpose: private SOP classes in the field often carry leading zeros in a component
# ("1.2.840.113619.4.030"), which PS3.5 forbids but storescp -pm accepts; refusing them would
# defeat the point of promiscuous mode.  Anything that is not digits and dots is refused.
_UID_SHAPE: Final = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def preference_list(preference: str) -> tuple[str, ...]:
    """Return the ordered transfer syntaxes for a preference key ("uncompressed", "all", ...).

    Raises ValueError for an unknown key, naming the key a storescp flag maps to if a flag was
    passed by mistake.
    """
    try:
        return PREFERENCES[preference]
    except KeyError:
        hint = ""
        if preference in STORESCP_FLAG_TO_PREFERENCE:
            hint = f" (storescp {preference} is {STORESCP_FLAG_TO_PREFERENCE[preference]!r})"
        choices = ", ".join(PREFERENCES)
        raise ValueError(
            f"unknown transfer syntax preference {preference!r}{hint}; one of {choices}"
        ) from None


def acceptor_contexts(
    preference: str, *, promiscuous: bool
) -> list[tuple[str, tuple[str, ...]]]:
    """Return the static acceptor contexts: (abstract syntax, transfer syntaxes in preference).

    Verification first, then every storage SOP class of ``STORAGE_SOP_CLASSES``; all share the
    one list of ``preference``, as in storescp (Verification included, even for +xa or +xs).

    ``promiscuous`` does not change the result, by design: storescp's -pm never changes how it
    negotiates SOP classes it knows, it only adds a pass for the ones it cannot name, which are
    known per association only -- use ``promiscuous_contexts_for`` for those.  The keyword is
    required so call sites state the mode they run in.
    """
    del promiscuous  # see docstring: the static table is the same in both modes
    syntaxes = preference_list(preference)
    return [(VERIFICATION_SOP_CLASS, syntaxes)] + [(uid, syntaxes) for uid in STORAGE_SOP_CLASSES]


def commitment_context() -> tuple[str, tuple[str, ...]]:
    """The Storage Commitment Push Model context we accept with [storage_commitment]:
    explicit, then implicit VR little endian (its data sets are read by our own reader,
    commitment/dataset.py, which knows these two only).  The requestor may act as SCU only:
    we never send N-ACTION (role selection, PS3.7 D.3.3.4)."""
    return COMMITMENT_SOP_CLASS, COMMITMENT_TRANSFER_SYNTAXES


def choose_transfer_syntax(
    preference_list: Sequence[str], proposed: Sequence[str]
) -> str | None:
    """Return the transfer syntax an acceptor picks for one proposed presentation context.

    The rule of both DCMTK and pynetdicom: the first syntax of *our* list that the requestor
    proposed; the requestor's order is irrelevant.  None means the context is refused with
    "transfer syntaxes not supported" (0x04).  UIDs are compared exactly, as decoded.
    """
    offered = set(proposed)
    return next((syntax for syntax in preference_list if syntax in offered), None)


def is_unknown_sop_class(uid: str) -> bool:
    """True if storescp -pm would accept ``uid`` as an unknown (typically private) SOP class.

    storescp accepts an abstract syntax in promiscuous mode exactly when DCMTK cannot name the
    UID.  "Named" here is pydicom's UID dictionary plus DCMTK 3.6.7's extra names, a superset of
    DCMTK's, so this never accepts what storescp refuses.  Values that are not digits and dots
    (or are longer than 64 characters) are refused too.
    """
    if len(uid) > 64 or _UID_SHAPE.fullmatch(uid) is None:
        return False
    if uid in _STATIC_ABSTRACT_SYNTAXES or uid in _DCMTK_ONLY_NAMED_UIDS:
        return False
    # UID.type is the dictionary's UID type ("SOP Class", "Transfer Syntax", ...), "" if unknown.
    # No validation: a leading-zero private UID must neither warn nor (in RAISE mode) raise.
    return not UID(uid, validation_mode=pydicom_config.IGNORE).type


class ProposedContext(Protocol):
    """What ``promiscuous_contexts_for`` reads from a proposed presentation context."""

    @property
    def abstract_syntax(self) -> str | None: ...


def promiscuous_contexts_for(
    requested_contexts: Iterable[ProposedContext],
    preference: str,
    *,
    supported: Collection[str] | None = None,
) -> list[tuple[str, tuple[str, ...]]]:
    """Return the acceptor contexts promiscuous mode adds for one A-ASSOCIATE-RQ.

    ``requested_contexts`` are the proposed presentation contexts (pynetdicom
    ``PresentationContext`` items, or anything with ``.abstract_syntax``).  For each distinct
    abstract syntax that is not in ``supported`` (default: the abstract syntaxes of
    ``acceptor_contexts``) and is unknown (``is_unknown_sop_class``), one context with *our*
    whole preference list is returned, in order of first proposal.  The list is not narrowed to
    what was proposed: negotiation picks per proposed context, and an unknown SOP class proposed
    with none of our syntaxes must be refused with "transfer syntaxes not supported" (0x04), as
    storescp does, not with "abstract syntax not supported" (0x03).
    """
    syntaxes = preference_list(preference)
    have = _STATIC_ABSTRACT_SYNTAXES if supported is None else supported
    added: dict[str, tuple[str, ...]] = {}
    for context in requested_contexts:
        uid = context.abstract_syntax
        if uid is None:
            continue
        uid = str(uid)
        if uid not in added and uid not in have and is_unknown_sop_class(uid):
            added[uid] = syntaxes
    return list(added.items())
