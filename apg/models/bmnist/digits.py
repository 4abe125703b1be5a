"""Digit images for bouncing MNIST, offline: MNIST from IDX files, or scikit-learn's bundled 8x8 digits.

* `read_idx`: an IDX image file (the MNIST format), gzipped or not.
* `mnist`: MNIST's training (or test) images from a directory holding the standard files
  (``train-images-idx3-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``); nothing is downloaded.
* `sklearn_digits`: the 1,797 8x8 digits that ship with scikit-learn
  (``sklearn.datasets.load_digits``, no download; ``pip install -e ".[bmnist]"``).
* `load_digits`: one of them, optionally resized to the profile's digit size.
* `digit_split`: the training and held-out digits: MNIST's training and test sets when the test file is
  there, else the last sixth of the images held out (`split_digits`).

Images are float32 tensors ``(n, h, w)`` with values in ``[0, 1]``.
"""

from __future__ import annotations

import gzip
import os
import struct
from typing import Optional, Tuple

import torch

from ...errors import APGError

__all__ = ["MNIST_FILES", "MNIST_TEST_FILES", "digit_split", "load_digits", "mnist", "read_idx", "sklearn_digits",
           "split_digits"]

#: the standard names of MNIST's training images, in the order they are looked for
MNIST_FILES = ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz", "train-images.idx3-ubyte")
#: the standard names of MNIST's test images
MNIST_TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz", "t10k-images.idx3-ubyte")


def read_idx(path: str) -> torch.Tensor:
    """An IDX file of unsigned bytes (magic ``0x00000803`` for images) as a uint8 tensor of its shape.

    Gzipped files (``.gz``) are read transparently.

    Raises:
        APGError: not an IDX file of unsigned bytes, or a truncated one (the path and what was found).
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:  # type: ignore[operator]
        data = f.read()
    if len(data) < 4:
        raise APGError(f"{path}: not an IDX file (only {len(data)} bytes)")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise APGError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()}, expected 000008xx)")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = 1
    for s in shape:
        count *= s
    if len(data) - header != count:
        raise APGError(f"{path}: the header announces shape {shape} ({count} bytes) but {len(data) - header} follow")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def _mnist_file(directory: str, names: Tuple[str, ...]) -> Optional[str]:
    for name in names:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    return None


def mnist(directory: str, test: bool = False) -> torch.Tensor:
    """MNIST's images in ``[0, 1]`` from ``directory``.

    The training set ``(60000, 28, 28)`` (`MNIST_FILES`), or with ``test`` the test set ``(10000, 28, 28)``
    (`MNIST_TEST_FILES`).
    """
    names = MNIST_TEST_FILES if test else MNIST_FILES
    path = _mnist_file(directory, names)
    if path is None:
        raise APGError(f"--mnist-dir {directory}: none of {list(names)} found (nothing is downloaded; get MNIST's "
                       f"{'test' if test else 'training'} images from its usual sources)")
    images = read_idx(path)
    if images.dim() != 3:
        raise APGError(f"{path}: expected images (n, h, w), got an IDX array of shape {tuple(images.shape)}")
    return images.float() / 255.0


def sklearn_digits() -> torch.Tensor:
    """scikit-learn's bundled digits ``(1797, 8, 8)`` in ``[0, 1]`` (its pixel values 0-16, divided by 16)."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError:
        raise APGError("the offline digits need scikit-learn: pip install -e \".[bmnist]\" (or pass --mnist-dir "
                       "with MNIST's IDX files)") from None
    images = _load().images  # float64 (1797, 8, 8), values 0..16
    return torch.as_tensor(images, dtype=torch.float32) / 16.0


def _resized(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] != size or images.shape[-2] != size:
        images = torch.nn.functional.interpolate(images.unsqueeze(1), size=(size, size), mode="bilinear",
                                                 align_corners=False, antialias=True).squeeze(1).clamp(0, 1)
    return images.contiguous()


def load_digits(size: int, mnist_dir: Optional[str] = None) -> torch.Tensor:
    """Digit images ``(n, size, size)`` in ``[0, 1]``.

    MNIST's training images from ``mnist_dir`` if given, else scikit-learn's 8x8 digits; resized (bilinear,
    antialiased) when their size differs from ``size``.
    """
    return _resized(mnist(mnist_dir) if mnist_dir is not None else sklearn_digits(), size)


def split_digits(images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(train, test)``: the digit images without and with their last sixth (held out for evaluation)."""
    n_test = max(1, images.shape[0] // 6)
    return images[:-n_test], images[-n_test:]


def digit_split(size: int, mnist_dir: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """``(train, held_out, source)``: digit images ``(n, size, size)`` for training and for evaluation.

    With ``mnist_dir`` holding MNIST's test images (`MNIST_TEST_FILES`), all of its training images train and
    its test images are held out (the paper's split); otherwise (MNIST's training images alone, or
    scikit-learn's digits) the last sixth is held out (`split_digits`). ``source`` says which.
    """
    images = load_digits(size, mnist_dir)
    if mnist_dir is not None and _mnist_file(mnist_dir, MNIST_TEST_FILES) is not None:
        return images, _resized(mnist(mnist_dir, test=True), size), "MNIST test set"
    train, held_out = split_digits(images)
    what = "MNIST's training images (no t10k file)" if mnist_dir is not None else "scikit-learn's digits"
    return train, held_out, f"last sixth of {what}"
