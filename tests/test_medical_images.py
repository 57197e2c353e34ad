"""DICOM and NIfTI images (fedmm.data.medical): pixel values through rescale, window, MONOCHROME1,
the stated frame / slice; the errors for compressed data without a decoder and pixel-less DICOM;
a site directory of ``.dcm`` records through ``load_site``.  Files are built with pydicom and
nibabel themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    BasicTextSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    generate_uid,
)

from fedmm.data import Task  # noqa: E402
from fedmm.data.common import ImageReadError, load_image, read_images  # noqa: E402
from fedmm.data.medical import ImageOptions, medical_kind, window  # noqa: E402
from fedmm.data.schema import SCHEMA_FILE, Schema, read_schema, write_schema  # noqa: E402
from fedmm.data.sites import load_site  # noqa: E402


def dicom(path: Path, pixels: np.ndarray | None, *, syntax=ExplicitVRLittleEndian,
          sop=CTImageStorage, photometric: str = "MONOCHROME2", encapsulated: bytes = b"",
          **attrs) -> Path:  # fmt: skip
    """A DICOM file (preamble + DICM) holding ``pixels``: (rows, cols) or (frames, rows, cols)
    unsigned 16-bit, or (rows, cols, 3) uint8 RGB; None: no pixel data at all.  ``encapsulated``:
    instead of the pixels' bytes, these as one encapsulated fragment (a compressed syntax)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop, meta.MediaStorageSOPInstanceUID
    if pixels is not None:
        rgb = pixels.ndim == 3 and pixels.shape[-1] == 3
        frames = pixels if pixels.ndim == 3 and not rgb else pixels[None]
        ds.Rows, ds.Columns = frames.shape[1:3]
        if len(frames) > 1:
            ds.NumberOfFrames = len(frames)
        ds.SamplesPerPixel = 3 if rgb else 1
        ds.PhotometricInterpretation = "RGB" if rgb else photometric
        if rgb:
            ds.PlanarConfiguration = 0
        bits = 8 * pixels.dtype.itemsize
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        if encapsulated:
            ds.PixelData = encapsulate([encapsulated])
            ds["PixelData"].VR = "OB"
    for key, value in attrs.items():
        setattr(ds, key, value)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def gray(image: np.ndarray) -> np.ndarray:
    """The one channel of a grayscale RGB result (the three are equal)."""
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    return image[..., 0]


def u8(y: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(y) * 255.0), 0, 255).astype(np.uint8)


# stored 16-bit values; with RescaleIntercept -1024 they are HU -1024, -160, 40, 240, 1976
STORED = np.array([[0, 864, 1064, 1264, 3000]] * 5, dtype=np.uint16)
HU = STORED.astype(np.float64) - 1024.0


def test_16_bit_rescale_then_the_files_first_window(tmp_path):
    path = dicom(tmp_path / "ct.dcm", STORED, RescaleSlope=1, RescaleIntercept=-1024,
                 WindowCenter=[40, 300], WindowWidth=[400, 1500])  # fmt: skip
    got = gray(load_image(path, 5))
    # LINEAR window c=40, w=400 (the first of each multi-value), PS3.3 C.11.2.1.2.1
    expected = np.clip((HU - 39.5) / 399 + 0.5, 0, 1)
    assert np.array_equal(got, u8(expected))
    assert got[0].tolist() == [0, 0, 128, 255, 255]  # HU 40 is mid-grey: 16 bits kept, not cut
    # the values agree with the window formula itself
    assert np.allclose(window(HU, 40, 400), expected)


def test_slope_and_sigmoid_window_and_linear_exact(tmp_path):
    path = dicom(tmp_path / "s.dcm", STORED, RescaleSlope=2, RescaleIntercept=-2048,
                 WindowCenter=80, WindowWidth=800, VOILUTFunction="SIGMOID")  # fmt: skip
    values = STORED * 2.0 - 2048
    assert np.array_equal(gray(load_image(path, 5)),
                          u8(1 / (1 + np.exp(-4 * (values - 80) / 800))))  # fmt: skip
    path = dicom(tmp_path / "e.dcm", STORED, WindowCenter=1500, WindowWidth=3000,
                 VOILUTFunction="LINEAR_EXACT")  # fmt: skip
    assert np.array_equal(gray(load_image(path, 5)), u8(np.clip(STORED / 3000.0, 0, 1)))


def test_default_window_of_the_task_only_when_the_file_has_none(tmp_path):
    bare = dicom(tmp_path / "bare.dcm", STORED, RescaleIntercept=-1024, RescaleSlope=1)
    with pytest.raises(ImageReadError, match=r"bare\.dcm cannot be read \(the DICOM file has "
                       r"no window.*\"image_window\": \[center, width\]"):  # fmt: skip
        read_images([bare], 5)
    soft = ImageOptions((40, 400))
    assert np.array_equal(
        gray(load_image(bare, 5, soft)), u8(np.clip((HU - 39.5) / 399 + 0.5, 0, 1))
    )
    assert np.array_equal(gray(load_image(bare, 5, ImageOptions("minmax"))),
                          u8((HU - HU.min()) / (HU.max() - HU.min())))  # fmt: skip
    # a file's own window wins over the task's default
    own = dicom(tmp_path / "own.dcm", STORED, RescaleIntercept=-1024, RescaleSlope=1,
                WindowCenter=-600, WindowWidth=1500)  # fmt: skip
    assert np.array_equal(load_image(own, 5, soft), load_image(own, 5, ImageOptions()))
    assert gray(load_image(own, 5, soft))[0, 2] != 128
    with pytest.raises(ValueError, match=r"\[center, width\].*width > 0"):
        ImageOptions((40, 0))


def test_monochrome1_is_inverted(tmp_path):
    kw = {"RescaleSlope": 1, "RescaleIntercept": -1024, "WindowCenter": 40, "WindowWidth": 400}
    mono2 = gray(load_image(dicom(tmp_path / "m2.dcm", STORED, **kw), 5))
    mono1 = gray(load_image(dicom(tmp_path / "m1.dcm", STORED, photometric="MONOCHROME1",
                                  **kw), 5))  # fmt: skip
    assert np.array_equal(mono1, u8(1 - np.clip((HU - 39.5) / 399 + 0.5, 0, 1)))
    assert mono1[0].tolist() == [255, 255, 127, 0, 0] and mono2[0].tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize("frames, picked", [(3, 1), (4, 2), (5, 2)])
def test_multi_frame_gives_the_middle_frame(tmp_path, frames, picked):
    stack = np.stack([np.full((4, 4), 10 * (k + 1), np.uint16) for k in range(frames)])
    stack[:, 0, 0] = 0  # not constant
    # LINEAR_EXACT c=127.5, w=255 maps a value v to v / 255: the result is the frame itself
    path = dicom(tmp_path / "mf.dcm", stack, WindowCenter=127.5, WindowWidth=255,
                 VOILUTFunction="LINEAR_EXACT")  # fmt: skip
    got = gray(load_image(path, 4))
    assert np.array_equal(got, stack[picked].astype(np.uint8))
    assert got[1, 1] == 10 * (picked + 1)


def test_enhanced_multi_frame_uses_the_frames_functional_groups(tmp_path):
    stack = np.stack([np.full((4, 4), 1000 + 100 * k, np.uint16) for k in range(3)])
    stack[:, 0, 0] = 0

    def group(**items):
        item = Dataset()
        for name, attrs in items.items():
            inner = Dataset()
            for key, value in attrs.items():
                setattr(inner, key, value)
            setattr(item, name, [inner])
        return item

    shared = group(PixelValueTransformationSequence={"RescaleSlope": 1, "RescaleIntercept": -1024})
    frames = [group(FrameVOILUTSequence={"WindowCenter": 100 * k, "WindowWidth": 201})
              for k in range(3)]  # fmt: skip
    path = dicom(tmp_path / "enhanced.dcm", stack, SharedFunctionalGroupsSequence=[shared],
                 PerFrameFunctionalGroupsSequence=frames)  # fmt: skip
    hu = stack[1] - 1024.0  # the middle frame: 76 HU, windowed by its own c=100, w=201
    assert np.array_equal(gray(load_image(path, 4)), u8(np.clip((hu - 99.5) / 200 + 0.5, 0, 1)))


def test_signed_pixels_and_a_voi_lut_sequence(tmp_path):
    signed = np.array([[-1000, -10, 0, 10, 1000]] * 5, dtype=np.int16)
    path = dicom(tmp_path / "signed.dcm", signed.view(np.uint16), PixelRepresentation=1,
                 WindowCenter=0, WindowWidth=21, VOILUTFunction="LINEAR_EXACT")  # fmt: skip
    assert gray(load_image(path, 5))[0].tolist() == [0, u8(0.5 - 10 / 21), 128, u8(0.5 + 10 / 21),
                                                     255]  # fmt: skip
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 8]  # 4 entries for the values 0..3, 8-bit output
    lut.add_new(0x00283006, "US", [0, 10, 200, 255])  # LUT Data
    path = dicom(tmp_path / "lut.dcm", np.array([[0, 1, 2, 3, 9]] * 5, np.uint16),
                 VOILUTSequence=[lut])  # fmt: skip
    assert gray(load_image(path, 5))[0].tolist() == [0, 10, 200, 255, 255]


def test_malformed_window_names_the_file(tmp_path):
    path = dicom(tmp_path / "odd.dcm", STORED, WindowCenter=40, WindowWidth=0)
    with pytest.raises(ImageReadError, match=r"odd\.dcm cannot be read \(WindowWidth 0"):
        read_images([path], 5)


def test_rgb_dicom_is_passed_through(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    path = dicom(tmp_path / "photo.dcm", rgb, sop="1.2.840.10008.5.1.4.1.1.77.1.4")  # VL photo
    assert np.array_equal(load_image(path, 6), rgb)


def test_dicom_without_extension_is_found_by_its_magic(tmp_path):
    path = dicom(tmp_path / "IM0001", STORED, WindowCenter=40, WindowWidth=400,
                 RescaleIntercept=-1024, RescaleSlope=1)  # fmt: skip
    assert medical_kind(path) == "dicom" and medical_kind(tmp_path / "x.png") is None
    assert gray(load_image(path, 5))[0].tolist() == [0, 0, 128, 255, 255]


def test_compressed_without_decoder_names_the_syntax_and_the_package(tmp_path):
    from pydicom.pixels import get_decoder

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    path = dicom(tmp_path / "jls.dcm", np.zeros((4, 4), np.uint16), syntax=JPEGLSLossless,
                 encapsulated=b"\xff\xd8\xff\xf7 not really JPEG-LS \xff\xd9",
                 WindowCenter=1, WindowWidth=2)  # fmt: skip
    with pytest.raises(ImageReadError) as err:
        read_images([path], 4, ["train.jsonl:3"])
    text = str(err.value)
    assert f"train.jsonl:3: image {path} cannot be read" in text
    assert "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)" in text
    assert "no decoder for it is installed" in text and "pylibjpeg-libjpeg" in text
    assert "gdcm" in text


def test_corrupt_compressed_pixel_data_names_the_syntax(tmp_path):
    path = dicom(tmp_path / "j2k.dcm", np.zeros((4, 4), np.uint16), syntax=JPEG2000Lossless,
                 encapsulated=b"\xff\x4f\xff\x51 garbage, not a JPEG 2000 codestream",
                 WindowCenter=1, WindowWidth=2)  # fmt: skip
    # whether a JPEG 2000 decoder is installed or not, the error names the transfer syntax
    with pytest.raises(ImageReadError, match=r"(?s)j2k\.dcm cannot be read \(.*JPEG 2000 Image "
                       r"Compression \(Lossless Only\).*pylibjpeg"):  # fmt: skip
        read_images([path], 4)


def test_pixel_less_dicom_is_not_an_image(tmp_path):
    path = dicom(tmp_path / "report.dcm", None, sop=BasicTextSRStorage, Modality="SR")
    with pytest.raises(ImageReadError, match=r"report\.dcm cannot be read \(not an image DICOM "
                       r"\(SOP class Basic Text SR Storage \(1\.2\.840\.10008\.5\.1\.4\.1\.1"
                       r"\.88\.11\)\)"):  # fmt: skip
        read_images([path], 4)


def test_missing_pydicom_names_the_file_and_the_install(tmp_path, monkeypatch):
    import sys

    from fedmm.data.medical import MissingPackageError

    path = dicom(tmp_path / "ct.dcm", STORED, WindowCenter=40, WindowWidth=400)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(MissingPackageError, match=r"ct\.dcm: .* needs pydicom.*pip install "
                       r"pydicom=="):  # fmt: skip
        read_images([path], 5)  # never one "unreadable" file among others
    monkeypatch.setitem(sys.modules, "nibabel", None)
    nii = tmp_path / "v.nii"
    nii.write_bytes(b"")
    with pytest.raises(MissingPackageError, match=r"v\.nii: .* needs nibabel.*pip install nibabel"):
        load_image(nii, 4)


# ---------------------------------------------------------------------- NIfTI
VOLUME = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # (x, y, z), RAS+ with eye(4)


def displayed(plane: np.ndarray) -> np.ndarray:
    """A (x, y) axial plane as shown: anterior at the top, patient right on the left."""
    return plane.T[::-1, ::-1]


def test_nifti_middle_axial_slice_scaled_by_the_volume_range(tmp_path):
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(VOLUME, np.eye(4)), path)
    plane = VOLUME[:, :, 3].astype(np.float64)  # z = 6 // 2
    expected = u8(displayed((plane - VOLUME.min()) / (VOLUME.max() - VOLUME.min())))
    from fedmm.data.medical import read_nifti

    # the pipeline's image: the 5 x 4 slice resized to a grey 5 x 5 square; the values are
    # compared at the slice's own size (a resize to a square interpolates)
    assert gray(load_image(path, 5)).shape == (5, 5)
    assert np.array_equal(u8(read_nifti(path)), expected)
    # the same anatomy stored left-right flipped (LAS) reads the same after reorientation
    flipped = tmp_path / "las.nii"
    nib.save(nib.Nifti1Image(VOLUME[::-1].copy(), np.diag([-1.0, 1, 1, 1])), flipped)
    assert np.array_equal(u8(read_nifti(flipped)), expected)


def test_nifti_scl_slope_inter_and_cal_range(tmp_path):
    from fedmm.data.medical import read_nifti

    img = nib.Nifti1Image(VOLUME, np.eye(4))
    img.header.set_slope_inter(2.0, -10.0)  # physical = 2 * stored - 10
    img.header["cal_min"], img.header["cal_max"] = 0.0, 100.0  # the file's display range
    path = tmp_path / "scaled.nii"
    nib.save(img, path)
    physical = VOLUME[:, :, 3] * 2.0 - 10.0
    assert np.array_equal(u8(read_nifti(path)), u8(displayed(np.clip(physical / 100.0, 0, 1))))
    # no display range: the task's window, else the volume's min..max
    img.header["cal_min"], img.header["cal_max"] = 0.0, 0.0
    nib.save(img, path)
    assert np.array_equal(u8(read_nifti(path, ImageOptions((50.5, 102)))),
                          u8(displayed(np.clip((physical - 50) / 101 + 0.5, 0, 1))))  # fmt: skip
    lo, hi = VOLUME.min() * 2.0 - 10, VOLUME.max() * 2.0 - 10
    assert np.array_equal(u8(read_nifti(path)), u8(displayed((physical - lo) / (hi - lo))))


def test_nifti_4d_series_is_an_error(tmp_path):
    path = tmp_path / "bold.nii"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 3), np.float32), np.eye(4)), path)
    with pytest.raises(ImageReadError, match=r"bold\.nii cannot be read \(a 4-D NIfTI"):
        read_images([path], 4)


# ---------------------------------------------------------------------- end to end
def test_a_dicom_site_goes_through_load_site(tiny_cfg, tmp_path):
    size = 6
    cfg = tiny_cfg.with_overrides({"model.image_size": size})
    site = tmp_path / "hospital-a"
    (site / "dicom").mkdir(parents=True)
    schema = Schema("ct-demo", {"ct": Task("single", ["normal", "bleed"])},
                    image_window={"ct": (40.0, 400.0)})  # fmt: skip
    write_schema(schema, site / SCHEMA_FILE)
    assert json.loads((site / SCHEMA_FILE).read_text())["tasks"][0]["image_window"] == [40, 400]
    assert read_schema(site / SCHEMA_FILE) == schema
    stored = np.linspace(824, 1304, size * size).reshape(size, size).astype(np.uint16)
    hu = stored - 1024.0  # -200 .. 280 HU
    # no window in the file: the schema's [40, 400]
    dicom(site / "dicom" / "a.dcm", stored, RescaleSlope=1, RescaleIntercept=-1024)
    # its own window (a bone window), MONOCHROME1
    dicom(site / "dicom" / "b.dcm", stored, RescaleSlope=1, RescaleIntercept=-1024,
          WindowCenter=300, WindowWidth=1500, photometric="MONOCHROME1")  # fmt: skip
    rows = {"train": [{"image": "dicom/a.dcm", "text": "bleed?", "answer": "bleed"},
                      {"image": "dicom/b.dcm", "text": "bleed?", "answer": "normal"}],
            "test": [{"image": "dicom/b.dcm", "text": "bleed?", "answer": "normal"}]}  # fmt: skip
    for split, records in rows.items():
        (site / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (c,) = load_site(site, cfg).clients
    a = u8(np.clip((hu - 39.5) / 399 + 0.5, 0, 1))
    b = u8(1 - np.clip((hu - 299.5) / 1499 + 0.5, 0, 1))
    assert c.train.images.shape == (2, size, size, 3) and c.train.images.dtype == np.uint8
    assert np.array_equal(c.train.images[0], np.repeat(a[..., None], 3, -1))
    assert np.array_equal(c.train.images[1], np.repeat(b[..., None], 3, -1))
    assert np.array_equal(c.test.images[0], c.train.images[1])
    assert c.train.labels.tolist() == [1, 0]

    # the same site without the schema's default window: the record and the file are named
    write_schema(Schema("ct-demo", {"ct": Task("single", ["normal", "bleed"])}), site / SCHEMA_FILE)
    with pytest.raises(ImageReadError, match=r"train\.jsonl:1: image .*a\.dcm cannot be read "
                       r"\(the DICOM file has no window"):  # fmt: skip
        load_site(site, cfg)


def test_schema_image_window_is_checked(tmp_path):
    path = tmp_path / SCHEMA_FILE
    task = {"name": "t", "kind": "single", "labels": ["a"]}
    for window_value, ok in (([40, 400], True), ("minmax", True), ([40], False),
                             ([40, -1], False), ("auto", False)):  # fmt: skip
        path.write_text(json.dumps({"fedmm_schema": 1, "name": "n",
                                    "tasks": [{**task, "image_window": window_value}]}))  # fmt: skip
        if ok:
            assert read_schema(path).image_window["t"] == (
                window_value if isinstance(window_value, str) else (40.0, 400.0))  # fmt: skip
        else:
            with pytest.raises(ValueError, match=r"schema\.json: field 'tasks\[0\]\.image_window'"):
                read_schema(path)
    plain = Schema("n", {"t": Task("single", ["a"])})
    assert "image_window" not in plain.to_json()  # schemas without it keep their hash


def test_jsonl_benchmark_reads_dicom_with_its_own_window(tmp_path):
    from fedmm.config import FedmmConfig
    from fedmm.data import BENCHMARKS

    for k in range(2):
        dicom(tmp_path / f"{k}.dcm", STORED, RescaleSlope=1, RescaleIntercept=-1024,
              WindowCenter=40, WindowWidth=400)  # fmt: skip
    rec = [{"image": f"{k}.dcm", "text": "q", "answer": "a", "client": "x"} for k in range(2)]
    (tmp_path / "train.jsonl").write_text(json.dumps(rec[0]) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps(rec[1]) + "\n")
    cfg = FedmmConfig().with_overrides({"data.benchmark": "jsonl", "data.data_dir": str(tmp_path),
                                        "fed.clients": 1, "model.image_size": 5})  # fmt: skip
    (c,) = BENCHMARKS["jsonl"](cfg).clients
    assert gray(c.train.images[0])[0].tolist() == [0, 0, 128, 255, 255]
