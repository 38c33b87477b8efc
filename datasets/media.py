"""Photos and videos named on the command line (files, folders, globs), read as batches of model inputs, decoded in a
background thread so that decoding overlaps with the forward passes."""
from __future__ import annotations

import glob
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import torch

from datasets.shanghaitech import IMAGE_SUFFIXES, image_size, load_image, natural_key, pixels_to_tensor
from datasets.transforms import resize_to_multiple
from utils.errors import ToolkitError

# FFmpeg's own lines about a broken file would precede the one-line error; read when a capture opens
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


@dataclass(frozen=True)
class Source:
    path: Path
    video: bool
    frames: int  # 1 for an image; a video's frame count as its container reports it (an estimate)


def _kind(path: Path) -> bool | None:
    """True for a video, False for an image, None for anything else (by suffix)."""
    suffix = path.suffix.lower()
    return True if suffix in VIDEO_SUFFIXES else False if suffix in IMAGE_SUFFIXES else None


def _video(path: Path) -> Source:
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise ToolkitError(f"cannot open video {path}: not a video OpenCV can decode")
        ok, _ = capture.read()
        if not ok:
            raise ToolkitError(f"video {path} has no frames")
        return Source(path, True, max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 1))
    finally:
        capture.release()


def sources(paths: Iterable[str | Path]) -> list[Source]:
    """Every image and video the arguments name, in order (a folder's files and a glob's matches naturally sorted),
    each checked readable from its header (a video: its first frame); any other argument is one error."""
    found = []
    for arg in map(str, paths):
        path = Path(arg)
        if path.is_dir():
            files = sorted((p for p in path.iterdir() if p.is_file() and _kind(p) is not None), key=natural_key)
            if not files:
                raise ToolkitError(f"{path} holds no images or videos ({', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)})")
        elif path.exists():
            files = [path]
        elif glob.has_magic(arg):
            files = sorted((Path(p) for p in glob.glob(arg) if Path(p).is_file()), key=natural_key)
            if not files:
                raise ToolkitError(f"no file matches {arg}")
        else:
            raise ToolkitError(f"no such file or folder: {arg}")
        for file in files:
            video = _kind(file)
            if video is None:
                raise ToolkitError(f"{file} is not an image ({', '.join(IMAGE_SUFFIXES)}) or a video "
                                   f"({', '.join(VIDEO_SUFFIXES)})")
            if video:
                found.append(_video(file))
            else:
                image_size(file)  # the header: a file that is no image fails now, not mid-run
                found.append(Source(file, False, 1))
    return found


def _frames(source: Source, every: int, grey: bool) -> Iterator[tuple[int | None, torch.Tensor]]:
    """(frame index or None for an image, (3, H, W) in [0, 1]); a grey model gets the luma in three channels."""
    if not source.video:
        yield None, load_image(source.path, grey)
        return
    capture = cv2.VideoCapture(str(source.path))
    try:
        index = 0
        while True:
            ok = capture.grab()
            if not ok:
                return
            if index % every == 0:
                ok, frame = capture.retrieve()
                if not ok:
                    raise ToolkitError(f"cannot decode frame {index} of {source.path}")
                yield index, pixels_to_tensor(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY if grey else cv2.COLOR_BGR2RGB),
                                              grey)
            index += 1
    finally:
        capture.release()


def frame_total(found: list[Source], every: int) -> int:
    """How many inputs `batches` yields, as far as the video containers tell."""
    return sum(-(-s.frames // every) if s.video else 1 for s in found)


def batches(found: list[Source], size_multiple: int, batch_size: int, every: int = 1, grey: bool = False
            ) -> Iterator[tuple[list[tuple[Source, int | None]], torch.Tensor]]:
    """Batches of up to `batch_size` consecutive inputs of one size, resized as the datasets resize (each side
    floored to `size_multiple`): (what each one is, (N, 3, h, w))."""
    labels, images = [], []
    for source in found:
        for frame, image in _frames(source, every, grey):
            image = resize_to_multiple(image, size_multiple)
            if images and (image.shape != images[0].shape or len(images) == batch_size):
                yield labels, torch.stack(images)
                labels, images = [], []
            labels.append((source, frame))
            images.append(image)
    if images:
        yield labels, torch.stack(images)


def prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """`items`, produced by a background thread up to `depth` ahead (decoders release the GIL); its errors are
    raised here, in order."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                buffer.put(item)
            buffer.put(done)
        except BaseException as e:  # handed to the consumer, which raises it
            buffer.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full buffer
            try:
                buffer.get_nowait()
            except queue.Empty:
                thread.join(0.01)
