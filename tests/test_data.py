"""Image decoding shared by every reader: bit depths are scaled, not saturated, and failures are one line."""
import numpy as np
import pytest
import torch
from conftest import exif_jpeg
from PIL import Image, ImageOps

from heads.data import DataError, read_image, unwrap_worker_errors

VALUES_16 = np.array([[0, 255, 256, 4000], [32896, 65280, 65535, 1000]], dtype=np.uint16)
EXPECTED_8 = np.array([[0, 0, 1, 15], [128, 255, 255, 3]], dtype=np.uint8)  # v >> 8, as Pillow reduces 16-bit RGB


def test_16_bit_grayscale_png_is_scaled_not_saturated(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(VALUES_16).save(path)
    assert Image.open(path).mode == "I;16"
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == (2, 4, 3)
    assert (image == EXPECTED_8[..., None]).all()


def test_16_bit_rgb_png_is_scaled_the_same_way(tmp_path):
    """Pillow reduces 16-bit RGB PNGs to their high byte; the grayscale path above agrees with it."""
    path = tmp_path / "rgb16.png"
    _write_png16_rgb(path, np.stack([VALUES_16, VALUES_16[:, ::-1], VALUES_16], axis=-1))
    image = read_image(path)
    assert (image == np.stack([EXPECTED_8, EXPECTED_8[:, ::-1], EXPECTED_8], axis=-1)).all()


def test_32_bit_and_float_images_are_refused(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.ones((4, 4), np.float32)).save(path)
    with pytest.raises(DataError, match=f"{path}: mode F .* no 8-bit range"):
        read_image(path)


def test_decompression_bomb_is_one_line_naming_the_file_and_the_fix(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2 x 1000: Pillow refuses it
    with pytest.raises(DataError, match=f"{path}.*4096 pixels.*PIL.Image.MAX_IMAGE_PIXELS") as raised:
        read_image(path)
    assert "\n" not in str(raised.value)


def test_missing_and_corrupt_images_name_the_file(tmp_path):
    with pytest.raises(DataError, match=f"image not found: {tmp_path / 'none.jpg'}"):
        read_image(tmp_path / "none.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match=f"corrupt or unreadable image {tmp_path / 'junk.jpg'}"):
        read_image(tmp_path / "junk.jpg")


TURNS = {  # EXIF orientation -> what viewers do to the stored pixels (the EXIF specification's table)
    1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: np.rot90(a, 2), 4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", TURNS)
def test_the_exif_orientation_is_applied_as_viewers_do(tmp_path, orientation):
    stored = exif_jpeg(tmp_path / "photo.jpg", orientation)
    image = read_image(tmp_path / "photo.jpg")
    assert image.shape == TURNS[orientation](stored).shape and (image == TURNS[orientation](stored)).all()
    with Image.open(tmp_path / "photo.jpg") as photo:  # Pillow's reading of the tag agrees
        assert (image == np.asarray(ImageOps.exif_transpose(photo).convert("RGB"))).all()
    assert image.flags["C_CONTIGUOUS"]


def test_a_portrait_phone_photo_is_upright(tmp_path):
    """Stored 640 wide and 427 high with orientation 6, as phones write them: the photo is 427 x 640."""
    stored = exif_jpeg(tmp_path / "phone.jpg", 6, width=640, height=427)
    image = read_image(tmp_path / "phone.jpg")
    assert image.shape == (640, 427, 3) and (image == np.rot90(stored, -1)).all()


class _Failing(torch.utils.data.Dataset):
    def __init__(self, error: Exception):
        self.error = error

    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise self.error


@pytest.mark.parametrize("workers", [0, 1])
def test_worker_data_errors_keep_their_one_line(workers):
    loader = torch.utils.data.DataLoader(_Failing(DataError("corrupt or unreadable image a.jpg: broken")),
                                         num_workers=workers)
    with pytest.raises(DataError) as raised:
        list(unwrap_worker_errors(loader))
    assert str(raised.value) == "corrupt or unreadable image a.jpg: broken"


def test_other_worker_errors_keep_their_traceback():
    loader = torch.utils.data.DataLoader(_Failing(ZeroDivisionError("a bug")), num_workers=1)
    with pytest.raises(ZeroDivisionError, match="Caught ZeroDivisionError in DataLoader worker process 0"):
        list(unwrap_worker_errors(loader))


def _write_png16_rgb(path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one)."""
    import struct
    import zlib

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
