"""Synthetic images and videos drawn at test time: shapes, gradients and noise,
and edited copies of them (resized, recompressed, converted, cropped)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def drawing(seed: int, size: tuple[int, int] = (480, 360)) -> Image.Image:
    """A gradient with random shapes and some texture: enough detail for PDQ quality."""
    rng = np.random.default_rng(seed)
    width, height = size
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    colours = rng.uniform(0, 255, (2, 3))
    angle = rng.uniform(0, np.pi)
    t = np.clip(np.cos(angle) * x + np.sin(angle) * y, 0, 1)
    base = colours[0] * (1 - t) + colours[1] * t
    noise = rng.normal(0, 18, (height // 8, width // 8, 3))
    texture = np.asarray(Image.fromarray(np.clip(noise + 128, 0, 255).astype(np.uint8)).resize(size, Image.BICUBIC))
    image = Image.fromarray(np.clip(base + texture.astype(float) - 128, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 12))):
        x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
        x1, y1 = x0 + rng.integers(30, width // 2), y0 + rng.integers(30, height // 2)
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
    return image


def edited(image: Image.Image, how: str) -> Image.Image:
    width, height = image.size
    match how:
        case "resized":
            return image.resize((width // 2, height // 2), Image.LANCZOS)
        case "cropped":
            return image.crop((width // 100, height // 100, width - width // 100, height - height // 100))
        case "palette":
            return image.convert("P", palette=Image.ADAPTIVE, colors=64)
        case "greyscale":
            return image.convert("L")
        case "blurred":
            return image.filter(ImageFilter.GaussianBlur(1.2))
        case "brighter":
            return Image.eval(image, lambda v: min(255, int(v * 1.1) + 8))
        case _:
            raise ValueError(how)


def save_jpeg(image: Image.Image, path: Path, quality: int = 70) -> Path:
    image.convert("RGB").save(path, "JPEG", quality=quality)
    return path


def video(path: Path, seed: int, seconds: int = 8, fps: int = 10, size: tuple[int, int] = (320, 240),
          codec: str = "mpeg4", bit_rate: int = 800_000) -> Path:
    """A short clip: a textured scene that changes every second and drifts in between."""
    scenes = [np.asarray(drawing(seed * 100 + s, (size[0] + 64, size[1] + 64))) for s in range(seconds)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = bit_rate
        for index in range(seconds * fps):
            scene = scenes[index // fps]
            shift = index % fps * 3
            frame = np.ascontiguousarray(scene[shift : shift + size[1], shift : shift + size[0]])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def reencoded(source: Path, path: Path, size: tuple[int, int] = (240, 180), bit_rate: int = 300_000) -> Path:
    """The same clip decoded and encoded again, smaller and at a lower bit rate."""
    with av.open(str(source)) as reader, av.open(str(path), "w") as writer:
        stream = writer.add_stream("mpeg4", rate=10)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = bit_rate
        for frame in reader.decode(video=0):
            pixels = np.asarray(frame.to_image().resize(size, Image.BILINEAR))
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                writer.mux(packet)
        for packet in stream.encode():
            writer.mux(packet)
    return path
