"""Reading an input image; writing videos and images: MP4 through imageio-ffmpeg, GIF and PNG
through Pillow.

The output format follows the extension; the file appears whole or not at all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ParoError
from .fileio import atomic_path, check_output_file

VIDEO_SUFFIXES = (".mp4", ".gif", ".png")


def check_video_path(path: str | Path) -> Path:
    """Fail before any work if the output cannot be written."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ParoError(
            f"cannot write {path.name}: unknown extension {path.suffix or '(none)'}", "use " + ", ".join(VIDEO_SUFFIXES)
        )
    return check_output_file(path)


def write_video(frames: np.ndarray, path: str | Path, fps: int) -> Path:
    """frames: (F, H, W, 3) uint8. PNG takes the frames side by side in one image."""
    import imageio.v3 as iio

    path = check_video_path(path)
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".mp4":
            # H.264 in yuv420p needs even sides; macro_block_size=2 pads odd ones instead of
            # rescaling to multiples of 16.
            iio.imwrite(tmp, frames, plugin="FFMPEG", fps=fps, codec="libx264", macro_block_size=2)
        elif suffix == ".gif":
            iio.imwrite(tmp, frames, extension=".gif", duration=1000 / fps, loop=0)
        else:
            iio.imwrite(tmp, np.concatenate(list(frames), axis=1), extension=".png")
    return path


def read_image(path: str | Path):
    """An input image (an image-to-video pipeline's first frame) as an RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ParoError(f"input image {path} not found", "pass --image PATH of a PNG or JPEG file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ParoError(f"{path} is not a readable image ({exc})", "pass a PNG or JPEG file") from None
