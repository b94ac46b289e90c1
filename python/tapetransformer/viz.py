"""The attention "framebuffer": a batch's characters coloured by the model's attention weights,
with a loss ticker and the smoothed loss, as PNG frames and an animated GIF; and a loss-curve PNG.

Pillow only (the optional ``viz`` extra). Frames are drawn on a fixed character grid with Pillow's
built-in bitmap font, so a frame's size depends only on (rows, seq_len).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from tapetransformer.reference import WOLF_C

__all__ = ["FrameWriter", "frame_size", "plot_loss_curve", "render_frame", "weight_colour"]

CELL_W, CELL_H = 8, 14  # pixels per character cell
PAD = 6
TICKER_H = 48  # loss sparkline + text line
BG = (12, 12, 20)
FG = (230, 230, 230)


def weight_colour(w: float) -> tuple[int, int, int]:
    """0 → dark blue, 0.5 → magenta-red, 1 → yellow (a perceptually monotone-ish ramp)."""
    w = min(max(w, 0.0), 1.0)
    r = int(40 + 215 * min(1.0, 1.6 * w))
    g = int(20 + 215 * max(0.0, w - 0.45) / 0.55)
    b = int(110 + 60 * math.sin(math.pi * w) - 90 * w)
    return r, g, max(0, min(255, b))


def frame_size(rows: int, seq_len: int) -> tuple[int, int]:
    """(width, height) in pixels of a frame of ``rows`` × ``seq_len`` characters."""
    return 2 * PAD + seq_len * CELL_W, 2 * PAD + rows * CELL_H + TICKER_H


def _printable(c: str) -> str:
    if c == "\n":
        return "|"  # newline drawn as a bar
    return c if c.isprintable() and ord(c) < 256 else "?"


def render_frame(
    chars: Sequence[str], weights: torch.Tensor, losses: Sequence[float], smoothed: float, step: int
) -> Image.Image:
    """One frame.

    chars: ``rows`` strings of equal length S (the batch's characters); weights: (rows, S) attention
    weights (each row is min-max normalised for colour); losses: recent losses for the ticker.
    """
    w = weights.detach().float().cpu()
    if w.dim() != 2 or w.shape[0] != len(chars) or any(len(c) != w.shape[1] for c in chars):
        raise ValueError(f"weights {tuple(w.shape)} must be (rows, S) matching {len(chars)} strings of length S")
    rows, s = w.shape
    img = Image.new("RGB", frame_size(rows, s), BG)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    lo = w.min(dim=1, keepdim=True).values
    hi = w.max(dim=1, keepdim=True).values
    norm = (w - lo) / (hi - lo).clamp_min(1e-12)
    for r, line in enumerate(chars):
        y = PAD + r * CELL_H
        for i, c in enumerate(line):
            x = PAD + i * CELL_W
            col = weight_colour(float(norm[r, i]))
            draw.rectangle([x, y, x + CELL_W - 1, y + CELL_H - 2], fill=col)
            text_col = (0, 0, 0) if sum(col) > 380 else FG
            draw.text((x + 1, y + 1), _printable(c), fill=text_col, font=font)
    # loss ticker: sparkline of the recent losses, then the numbers
    top = PAD + rows * CELL_H + 4
    width = img.width - 2 * PAD
    vals = [v for v in losses if math.isfinite(v)]
    if len(vals) >= 2:
        vmin, vmax = min(vals), max(vals)
        span = max(vmax - vmin, 1e-9)
        pts = [(PAD + i * width / (len(vals) - 1), top + 24 - 22 * (v - vmin) / span) for i, v in enumerate(vals)]
        draw.line(pts, fill=(90, 200, 255), width=1)
    last = vals[-1] if vals else math.nan
    draw.text((PAD, top + 28), f"step {step}  loss {last:.4f}  smoothed {smoothed:.4f}", fill=FG, font=font)
    return img


def _atomic_image_save(save: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class FrameWriter:
    """Collects the loss stream, writes ``frame_{step:06d}.png`` per frame and rewrites
    ``train.gif`` (the last ``max_gif_frames`` frames) after each one, so a crash keeps the GIF."""

    def __init__(self, out_dir: str | os.PathLike, vocab: str, ticker: int = 200, max_gif_frames: int = 200,
                 gif_ms: int = 250) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.vocab = vocab
        self.ticker = ticker
        self.max_gif_frames = max_gif_frames
        self.gif_ms = gif_ms
        self.losses: list[float] = []
        self.smoothed = math.nan
        # a resumed run continues the GIF with the frames already on disk
        self.paths: list[Path] = sorted(self.dir.glob("frame_*.png"))[-max_gif_frames:]
        self.frames: list[Image.Image] = [self._palette(Image.open(p)) for p in self.paths]

    def observe(self, step: int, loss: float) -> None:
        """Record a step's loss; the smoothed loss is the notebook's EWMA with mixing constant 1/e."""
        self.losses.append(loss)
        self.losses = self.losses[-self.ticker:]
        if math.isfinite(loss):
            self.smoothed = loss if not math.isfinite(self.smoothed) else (1 - WOLF_C) * self.smoothed + WOLF_C * loss

    def frame(self, step: int, tokens: torch.Tensor, weights: torch.Tensor) -> Path:
        """tokens (rows, S) ids, weights (rows, S); returns the PNG's path."""
        chars = ["".join(self.vocab[int(i)] for i in row) for row in tokens.tolist()]
        img = render_frame(chars, weights, self.losses, self.smoothed, step)
        path = self.dir / f"frame_{step:06d}.png"
        _atomic_image_save(lambda p: img.save(p, format="PNG"), path)
        self.paths.append(path)
        self.frames = (self.frames + [self._palette(img)])[-self.max_gif_frames:]
        self._write_gif()
        return path

    @staticmethod
    def _palette(img: Image.Image) -> Image.Image:
        return img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)

    def _write_gif(self) -> None:
        first, rest = self.frames[0], self.frames[1:]
        _atomic_image_save(lambda p: first.save(p, format="GIF", save_all=True, append_images=rest,
                                                duration=self.gif_ms, loop=0), self.dir / "train.gif")

    def close(self) -> None:
        pass


def plot_loss_curve(
    rows: Sequence[dict[str, Any]], path: str | os.PathLike, size: tuple[int, int] = (640, 360)
) -> Path:
    """Train loss (thin), its 1/e-EWMA (thick) and validation loss (dots) against the step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 56, 12, 12, 28
    steps = [r["step"] for r in rows]
    train = [r["loss"] for r in rows]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None and math.isfinite(r["val_loss"])]
    smooth: list[float] = []
    for v in train:
        smooth.append(v if not smooth else (1 - WOLF_C) * smooth[-1] + WOLF_C * v)
    ys = [v for v in train + [v for _, v in val] if math.isfinite(v)]
    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    if not steps or not ys:
        draw.text((left + 8, top + 8), "no data", fill=(0, 0, 0), font=font)
        img.save(path)
        return path
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(ys), max(max(ys), min(ys) + 1e-6)

    def pt(sx: float, sy: float) -> tuple[float, float]:
        px = left + (sx - x0) / (x1 - x0) * (w - left - right)
        return px, h - bottom - (sy - y0) / (y1 - y0) * (h - top - bottom)

    for frac in (0.0, 0.5, 1.0):
        yv = y0 + frac * (y1 - y0)
        _, py = pt(x0, yv)
        draw.line([(left - 4, py), (left, py)], fill=(0, 0, 0))
        draw.text((4, py - 6), f"{yv:.3f}", fill=(0, 0, 0), font=font)
    draw.text((left, h - bottom + 6), f"step {x0}", fill=(0, 0, 0), font=font)
    draw.text((w - right - 70, h - bottom + 6), f"step {x1}", fill=(0, 0, 0), font=font)
    finite = [(s, v) for s, v in zip(steps, train) if math.isfinite(v)]
    if len(finite) >= 2:
        draw.line([pt(s, v) for s, v in finite], fill=(150, 180, 230), width=1)
        draw.line([pt(s, v) for s, v in zip(steps, smooth) if math.isfinite(v)], fill=(20, 60, 200), width=3)
    for s, v in val:
        px, py = pt(s, v)
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(220, 60, 30))
    draw.text((left + 8, top + 4), "train (thin), smoothed (thick), val (dots)", fill=(0, 0, 0), font=font)
    img.save(path)
    return path
