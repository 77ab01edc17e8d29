"""Video files (``.mp4`` and the like) in ms-swift ``videos`` columns, decoded into frames with PyAV.

qwen-vl-utils reads video files through one of three backends: torchvision's ``io.read_video`` (which needs
PyAV, and which torchvision 0.29, the pinned build, no longer has), decord or torchcodec (torchcodec needs
FFmpeg's shared libraries on the system, decord's last wheels are from 2021). PyAV's wheels bundle FFmpeg, so
it is the one decoder that installs from PyPI alone; vlgrpo pins it (``av``) and decodes with it directly.

A decoded video becomes a frame list, and from there it is exactly a frame-list video: the frames are
sampled evenly to ``data.video_max_frames`` (first and last kept, the rule frame folders follow), then
checked, resized into ``data.video_max_pixels`` and cached like images, and qwen-vl-utils builds the video
input from them. The file is decoded twice: once to count its frames (which also proves every frame
decodes), once to keep the sampled ones, so memory holds only the kept frames.

A file that does not open, holds no video stream, announces frames larger than the images' decompression-bomb
limit (``PIL.Image.MAX_IMAGE_PIXELS``), fails to decode, or decodes to fewer frames than its header announces
(a cut-off file) raises :class:`VideoDecodeError` with the reason.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image


class VideoDecodeError(ValueError):
    """A video file that cannot be decoded completely; the message says why."""


def even_indices(total: int, keep: int) -> list[int]:
    """``keep`` indices spread evenly over ``range(total)``, first and last included (all when total <= keep)."""
    if total <= keep:
        return list(range(total))
    if keep == 1:
        return [0]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def _walk(path: Path, keep: set[int] | None) -> tuple[int, dict[int, Image.Image]]:
    """Decode every frame of the first video stream → (frames decoded, {index: RGB image} for ``keep``)."""
    import av

    kept: dict[int, Image.Image] = {}
    n = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError("no video stream")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width or 0, stream.codec_context.height or 0
            if w * h > Image.MAX_IMAGE_PIXELS:      # the images' decompression-bomb limit, before decoding
                raise VideoDecodeError(f"has {w}x{h} px frames, more than {Image.MAX_IMAGE_PIXELS} px "
                                       f"(possible decompression bomb)")
            announced = int(stream.frames or 0)
            for frame in container.decode(stream):
                if keep is not None and n in keep:
                    kept[n] = frame.to_image().convert("RGB")
                n += 1
    except VideoDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError, RuntimeError) as e:
        raise VideoDecodeError(f"cannot be decoded ({type(e).__name__}: {e})") from e
    if n == 0:
        raise VideoDecodeError("no frame decodes")
    if announced and n < announced:        # a file cut short: the container promised more frames
        raise VideoDecodeError(f"only {n} of its {announced} frames decode (truncated?)")
    return n, kept


def decode_video(path: str | Path, max_frames: int) -> tuple[list[Image.Image], int]:
    """The video file's frames sampled evenly to at most ``max_frames`` → (RGB frames, frames in the file).

    Raises VideoDecodeError (why) when the file cannot be decoded completely."""
    path = Path(path)
    total, _ = _walk(path, None)
    idx = even_indices(total, max_frames)
    _, kept = _walk(path, set(idx))
    return [kept[i] for i in idx], total

