"""DICOM and NIfTI images for a record's ``image``: one 2-D picture in [0, 1], then 8-bit RGB.

Hospitals store images as DICOM (one file per image, or per multi-frame series) and volumes as
NIfTI.  ``fedmm.data.common.load_image`` sends a path here when ``medical_kind`` recognises it;
every other file goes to Pillow as before.  The result is what the rest of the pipeline expects:
uint8 ``(size, size, 3)`` RGB, resized bilinearly *before* quantising (the float values of the
window are resized, then rounded), grayscale repeated on the three channels.

Which files: a name ending in ``.dcm`` / ``.dicom`` (any case), or any file whose bytes 128..131
are ``DICM`` (the DICOM preamble and magic: a DICOM file without an extension) is DICOM; a name
ending in ``.nii`` / ``.nii.gz`` is NIfTI.

DICOM (``pydicom``), in the order the standard's grayscale pipeline applies it:

1. **Frame**: a multi-frame file (``NumberOfFrames`` > 1) gives its *middle* frame,
   ``NumberOfFrames // 2`` counted from 0 (frame 1 of 3, frame 2 of 4), and only that frame is
   decoded.
2. **Modality LUT**: ``RescaleSlope`` / ``RescaleIntercept`` (CT: Hounsfield units), from the
   dataset or, in an enhanced multi-frame file, from the frame's (or the shared) functional
   group ``PixelValueTransformationSequence``; a ``ModalityLUTSequence`` through pydicom.  The
   values stay float from here on: a 12- or 16-bit range is never cut to 8 bits before step 3.
3. **VOI window** to [0, 1]: the file's own ``WindowCenter`` / ``WindowWidth`` (the first value
   when the file lists several; also from the frame's ``FrameVOILUTSequence``), with its
   ``VOILUTFunction`` (``LINEAR`` -- the default --, ``LINEAR_EXACT``, ``SIGMOID``, PS3.3
   C.11.2.1.2); else the file's ``VOILUTSequence`` (its first LUT, scaled by the LUT's output
   range); else the *task's* default ``image_window`` (``ImageOptions.window``; in a site
   directory, the schema task field ``"image_window": [center, width]`` or ``"minmax"``).  A
   file with none of these is an error that says so: a CT slice scaled by its own min/max
   (air to bone) shows no soft tissue, so that scaling is never chosen silently -- ``"minmax"``
   asks for it.
4. **MONOCHROME1** (0 = white) is inverted: ``1 - y``.
5. Colour (``RGB``, ``YBR_*``: pydicom converts to RGB; ``PALETTE COLOR``: its palette) is
   passed through, divided by its largest possible value (``2**BitsStored - 1``); no window.

NIfTI (``nibabel``): the volume is reoriented to the closest canonical (RAS+) orientation, so the
third axis runs inferior -> superior, and the *middle axial slice* ``[:, :, Z // 2]`` is taken
(a 2-D file, or Z = 1, is its own slice).  Values are the header's scaled values (``scl_slope`` /
``scl_inter`` applied by nibabel), mapped to [0, 1] by the file's display range
``cal_min..cal_max`` when set, else the task's ``image_window``, else the *volume's* min..max (so
every slice of one volume shares one scale; a constant volume gives zeros).  The slice is shown
as a radiologist sees it: anterior at the top, the patient's right on the image's left.
Dimensions past the third must be 1 (a 4-D series is an error: pick a volume first).

Errors are ``ImageReadError`` with the reason and what to do (the caller adds the file and the
record): a compressed transfer syntax whose decoder is not installed (its name, UID and the
packages to install), pixel data that fails to decode, a DICOM without pixel data ("not an image
DICOM (SOP class ...)": SR, RTSTRUCT, ...), a missing window.  ``pydicom`` or ``nibabel`` not
being installed is a ``MissingPackageError`` (an ``ImportError``, never counted as one bad file):
it names the file and the ``pip install`` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmm.data.common import ImageReadError

PACKAGES = {"pydicom": "pydicom==3.0.2", "nibabel": "nibabel==5.4.2"}  # as pinned in pyproject
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


class MissingPackageError(ImportError):
    """A package needed to read a medical image is not installed (the message says which)."""


@dataclass(frozen=True)
class ImageOptions:
    """How a task's medical images are read (one per task; part of the image cache key).

    ``window``: the default VOI window for files that carry none: ``(center, width)`` in the
    file's modality units (e.g. ``(40, 400)``: CT soft tissue in HU), or ``"minmax"`` (the
    values' own range), or None (DICOM files must carry their own window; NIfTI uses min..max).
    """

    window: tuple[float, float] | str | None = None

    def __post_init__(self) -> None:
        if self.window is not None:
            object.__setattr__(self, "window", parse_window(self.window, "ImageOptions.window"))


def parse_window(value: object, where: str) -> tuple[float, float] | str:
    """``[center, width]`` (numbers, width > 0) as a tuple, or ``"minmax"``; else ``ValueError``
    starting with ``where``."""
    if value == "minmax":
        return "minmax"
    ok = (
        isinstance(value, list | tuple) and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        and all(np.isfinite(v) for v in value) and value[1] > 0
    )  # fmt: skip
    if not ok:
        raise ValueError(f"{where} must be [center, width] (numbers in the images' modality "
                         f"units, width > 0, e.g. [40, 400] for CT soft tissue) or \"minmax\", "
                         f"got {value!r}")  # fmt: skip
    return (float(value[0]), float(value[1]))


def medical_kind(path: Path) -> str | None:
    """``"dicom"``, ``"nifti"`` or None (any other image: Pillow reads it), by name, then by the
    DICOM magic ``DICM`` at byte 128 for files without a DICOM extension."""
    name = Path(path).name.lower()
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return None  # Pillow reports the file
    return "dicom" if len(head) == 132 and head[128:] == b"DICM" else None


def _require(package: str, path: Path):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise MissingPackageError(
            f"{path}: reading this {'DICOM' if package == 'pydicom' else 'NIfTI'} file needs "
            f"{package}, which is not installed: pip install {PACKAGES[package]}"
        ) from None


# ---------------------------------------------------------------------- windowing
def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI window of ``values`` (modality units) to [0, 1] (PS3.3 C.11.2.1.2).

    ``LINEAR``: 0 at or below ``c - 0.5 - (w - 1) / 2``, 1 above ``c - 0.5 + (w - 1) / 2``,
    ``(x - (c - 0.5)) / (w - 1) + 0.5`` between (``w`` >= 1);  ``LINEAR_EXACT``:
    ``(x - c) / w + 0.5`` clipped (``w`` > 0);  ``SIGMOID``: ``1 / (1 + exp(-4 (x - c) / w))``.
    """
    x = np.asarray(values, dtype=np.float64)
    if function == "LINEAR":
        if width < 1:
            raise ImageReadError(f"WindowWidth {width} is below 1, which a LINEAR window forbids")
        if width == 1:  # a threshold
            return (x > center - 0.5).astype(np.float64)
        y = (x - (center - 0.5)) / (width - 1) + 0.5
    elif function == "LINEAR_EXACT":
        y = (x - center) / width + 0.5
    elif function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    else:
        raise ImageReadError(
            f"VOILUTFunction {function!r} is not one of {', '.join(VOI_FUNCTIONS)}"
        )
    return np.clip(y, 0.0, 1.0)


def minmax(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """``values`` from ``lo..hi`` (default: their own min..max) to [0, 1], clipped; an empty range
    gives zeros."""
    x = np.asarray(values, dtype=np.float64)
    lo = float(x.min()) if lo is None else lo
    hi = float(x.max()) if hi is None else hi
    if hi <= lo:
        return np.zeros_like(x)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _task_window(values: np.ndarray, options: ImageOptions) -> np.ndarray:
    """A DICOM frame without a window of its own, through the task's default (module doc)."""
    if options.window == "minmax":
        return minmax(values)
    if options.window is None:
        raise ImageReadError(
            "the DICOM file has no window (no WindowCenter/WindowWidth, no VOILUTSequence) and "
            'its task sets no default: add "image_window": [center, width] (e.g. [40, 400] for '
            "CT soft tissue, in the modality's units after RescaleSlope/Intercept) or "
            '"image_window": "minmax" (each image\'s own range) to the task in schema.json'
        )
    center, width = options.window
    return window(values, center, width)


# ---------------------------------------------------------------------- DICOM
def _number(value: object) -> float:
    """A DS/IS value, or the first of a multi-valued one, as float."""
    from pydicom.multival import MultiValue

    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)


def _frame_item(ds, frame: int, sequence: str):
    """The first item of ``sequence`` in frame ``frame``'s functional group, else in the shared
    functional group (enhanced multi-frame DICOM), else None."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame),
                          ("SharedFunctionalGroupsSequence", 0)):  # fmt: skip
        items = ds.get(groups)
        inner = items[index].get(sequence) if items is not None and len(items) > index else None
        if inner:
            return inner[0]
    return None


def _modality_lut(ds, frame: int, pixels: np.ndarray) -> np.ndarray:
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return apply_modality_lut(pixels, ds).astype(np.float64)
    source = ds if "RescaleSlope" in ds or "RescaleIntercept" in ds else _frame_item(
        ds, frame, "PixelValueTransformationSequence")  # fmt: skip
    x = pixels.astype(np.float64)
    if source is None:
        return x
    slope = _number(source.get("RescaleSlope", 1.0))
    intercept = _number(source.get("RescaleIntercept", 0.0))
    return x * slope + intercept


def _voi(ds, frame: int, values: np.ndarray, options: ImageOptions) -> np.ndarray:
    source = ds if "WindowCenter" in ds and "WindowWidth" in ds else _frame_item(
        ds, frame, "FrameVOILUTSequence")  # fmt: skip
    if source is not None and "WindowCenter" in source and "WindowWidth" in source:
        function = str(source.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        return window(values, _number(source.WindowCenter), _number(source.WindowWidth),
                      function)  # fmt: skip
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        from pydicom.pixels import apply_voi

        lut = ds.VOILUTSequence[0]
        bits = int(lut.LUTDescriptor[2])
        indices = np.rint(values).astype(np.int64)  # a LUT is indexed by integer values
        return np.clip(apply_voi(indices, ds, index=0) / float(2**bits - 1), 0.0, 1.0)
    return _task_window(values, options)


def _syntax(ds):
    """The file's transfer syntax UID, or None when it has no file meta information."""
    meta = getattr(ds, "file_meta", None)
    return None if meta is None else meta.get("TransferSyntaxUID")


def _decoder_problem(ds) -> str | None:
    """Why this file's pixel data cannot be decoded here (no decoder installed), or None."""
    from pydicom.pixels import get_decoder

    syntax = _syntax(ds)
    if syntax is None:
        return None  # implicit little endian: native pixels
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return (f"transfer syntax {syntax} ({syntax.name}) has no pixel data decoder in pydicom; "
                "convert the file to an uncompressed transfer syntax (e.g. with dcmtk's "
                "dcmdjpeg / gdcmconv --raw)")  # fmt: skip
    if decoder.is_available:
        return None
    options = "; ".join(decoder.missing_dependencies)
    return (f"its pixel data is compressed with transfer syntax {syntax.name} ({syntax}) and no "
            f"decoder for it is installed; install one of: {options} (e.g. pip install "
            "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, or pip install python-gdcm), or "
            "decompress the file first (dcmtk's dcmdjpeg, gdcmconv --raw)")  # fmt: skip


def read_dicom(path: Path, options: ImageOptions | None = None) -> np.ndarray:
    """float ``(H, W)`` grayscale or ``(H, W, 3)`` RGB in [0, 1] of one DICOM file (module doc)."""
    pydicom = _require("pydicom", path)
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import UID

    options = options or ImageOptions()
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise ImageReadError(f"not a DICOM file ({exc}); a DICOM file starts with a 128-byte "
                             "preamble and 'DICM'") from None  # fmt: skip
    except (OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise ImageReadError(f"cannot parse the DICOM file ({type(exc).__name__}: {exc})") from None
    if not any(k in ds for k in PIXEL_KEYWORDS):
        meta = getattr(ds, "file_meta", None)
        sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
        what = f"{UID(sop).name} ({sop})" if sop else "none given"
        raise ImageReadError(f"not an image DICOM (SOP class {what}): it holds no pixel data; "
                             "point the record at an image (e.g. a CT, MR, CR or DX slice)")  # fmt: skip
    problem = _decoder_problem(ds)
    if problem is not None:
        raise ImageReadError(problem)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    frame = frames // 2  # the middle frame (0-based)
    from pydicom.pixels import pixel_array

    try:
        pixels = pixel_array(ds, index=frame if frames > 1 else None)
    except Exception as exc:  # a decoder plugin raises anything from RuntimeError to its own
        syntax = _syntax(ds)
        how = f"transfer syntax {syntax.name} ({syntax})" if syntax else "its transfer syntax"
        raise ImageReadError(
            f"its pixel data ({how}) cannot be decoded ({type(exc).__name__}: {exc}); the data "
            "may be corrupt or truncated, or need another decoder (pip install pylibjpeg "
            "pylibjpeg-libjpeg pylibjpeg-openjpeg, or python-gdcm)"
        ) from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(pixels, ds)
        return rgb.astype(np.float64) / float(np.iinfo(rgb.dtype).max)
    if pixels.ndim == 3:  # RGB, or YBR_* already converted to RGB by pydicom
        if pixels.shape[-1] != 3:
            raise ImageReadError(f"pixel array of shape {pixels.shape} with photometric "
                                 f"interpretation {photometric} is not one RGB image")  # fmt: skip
        if pixels.dtype.kind == "f":
            return minmax(pixels)
        bits = int(ds.get("BitsStored", 8 * pixels.dtype.itemsize))
        return np.clip(pixels.astype(np.float64) / float(2**bits - 1), 0.0, 1.0)
    if pixels.ndim != 2:
        raise ImageReadError(f"pixel array of shape {pixels.shape} is not one 2-D frame")
    if not photometric.startswith("MONOCHROME"):
        raise ImageReadError(f"photometric interpretation {photometric!r} is not supported")
    y = _voi(ds, frame, _modality_lut(ds, frame, pixels), options)
    return 1.0 - y if photometric == "MONOCHROME1" else y


# ---------------------------------------------------------------------- NIfTI
def read_nifti(path: Path, options: ImageOptions | None = None) -> np.ndarray:
    """float ``(H, W)`` in [0, 1]: the middle axial slice of one NIfTI file (module doc)."""
    nib = _require("nibabel", path)
    options = options or ImageOptions()
    try:
        img = nib.load(path)
        if len(img.shape) > 3 and any(n != 1 for n in img.shape[3:]):
            raise ImageReadError(f"a {len(img.shape)}-D NIfTI of shape {img.shape}: fedmm reads "
                                 "one 3-D volume per record; save the volume you mean on its "
                                 "own (e.g. nibabel's image.slicer[..., t])")  # fmt: skip
        img = nib.as_closest_canonical(img)  # RAS+: the third axis runs inferior -> superior
        volume = np.asarray(img.get_fdata(dtype=np.float64))
    except ImageReadError:
        raise
    except Exception as exc:  # nibabel raises ImageFileError, ValueError, EOFError, zlib errors
        raise ImageReadError(f"cannot read the NIfTI file ({type(exc).__name__}: {exc})") from None
    volume = volume.reshape(volume.shape[:3] if volume.ndim >= 3 else volume.shape)
    if volume.ndim == 3:
        volume_for_range = volume
        plane = volume[:, :, volume.shape[2] // 2]  # the middle axial slice
    elif volume.ndim == 2:
        volume_for_range = plane = volume
    else:
        raise ImageReadError(f"a NIfTI of shape {volume.shape} holds no 2-D slice")
    volume_for_range = np.where(np.isfinite(volume_for_range), volume_for_range, 0.0)
    plane = np.where(np.isfinite(plane), plane, 0.0)
    # (x: right, y: anterior) -> rows anterior..posterior, columns patient right..left
    plane = plane.T[::-1, ::-1]
    cal_min, cal_max = (float(img.header.get(k, 0.0)) for k in ("cal_min", "cal_max"))
    if cal_max > cal_min:  # the file's own display range
        return minmax(plane, cal_min, cal_max)
    if options.window is None or options.window == "minmax":  # the volume's own range
        return minmax(plane, float(volume_for_range.min()), float(volume_for_range.max()))
    return window(plane, *options.window)


# ---------------------------------------------------------------------- to the pipeline
def to_rgb8(picture: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``(size, size, 3)`` of a float picture in [0, 1]: each channel resized bilinearly
    in float (Pillow mode ``F``), then rounded to 0..255; grayscale repeated on 3 channels."""
    from PIL import Image

    channels = picture[..., None] if picture.ndim == 2 else picture
    out = np.stack([
        np.asarray(Image.fromarray(np.ascontiguousarray(channels[..., c], dtype=np.float32), "F")
                   .resize((size, size), Image.BILINEAR))
        for c in range(channels.shape[-1])
    ], axis=-1)  # fmt: skip
    rgb8 = np.clip(np.rint(out.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(rgb8, (size, size, 3)))


def load_medical(path: Path, size: int, options: ImageOptions | None = None) -> np.ndarray:
    """uint8 ``(size, size, 3)`` RGB of one DICOM or NIfTI file (``medical_kind`` says which)."""
    kind = medical_kind(path)
    if kind is None:
        raise ValueError(f"{path} is neither DICOM nor NIfTI (see fedmm.data.medical.medical_kind)")
    try:
        picture = (read_dicom if kind == "dicom" else read_nifti)(path, options)
    except (ImageReadError, MissingPackageError):
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        # a malformed attribute (a WindowWidth that is no number, a DICOM without Rows, ...)
        raise ImageReadError(f"cannot interpret the {'DICOM' if kind == 'dicom' else 'NIfTI'} "
                             f"file ({type(exc).__name__}: {exc})") from exc  # fmt: skip
    return to_rgb8(picture, size)
