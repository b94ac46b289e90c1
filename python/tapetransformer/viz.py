"""The attention "framebuffer": a batch's characters coloured by the model's attention weights,
with a loss ticker and the smoothed loss, as PNG frames and an animated GIF; and a loss-curve PNG.

Pillow only (the optional ``viz`` extra). Frames are drawn on a fixed character grid with Pillow's
built-in bitmap font, so a frame's size depends only on (rows, seq_len).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from tapetransformer.fileio import atomic_write, remove_stale_temp
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


def _atomic_image_save(img: Image.Image, path: Path, **kw: Any) -> None:
    """Save through a temp file and a rename, with the user's umask (see :mod:`tapetransformer.fileio`)."""
    atomic_write(path, lambda f: img.save(f, **kw))


def _frame_step(p: Path) -> int | None:
    try:
        return int(p.stem.removeprefix("frame_"))
    except ValueError:
        return None


class FrameWriter:
    """Collects the loss stream, writes ``frame_{step:06d}.png`` per frame and rewrites
    ``train.gif`` (the last ``max_gif_frames`` frames) after each one, so a crash keeps the GIF."""

    def __init__(self, out_dir: str | os.PathLike, vocab: str, ticker: int = 200, max_gif_frames: int = 200,
                 gif_ms: int = 250, start_step: int | None = None) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.vocab = vocab
        self.ticker = ticker
        self.max_gif_frames = max_gif_frames
        self.gif_ms = gif_ms
        self.losses: list[float] = []
        self.smoothed = math.nan
        remove_stale_temp(self.dir / "train.gif")
        # A resumed run continues the GIF with the frames already on disk. With ``start_step``, frames
        # of later steps (drawn by a killed run after its last checkpoint, or by an earlier run in
        # this directory) are removed: the run draws them again.
        frames = sorted(self.dir.glob("frame_*.png"))
        if start_step is not None:
            stale = [p for p in frames if _frame_step(p) is None or _frame_step(p) > start_step]
            for p in stale:
                remove_stale_temp(p)
                p.unlink(missing_ok=True)
            frames = [p for p in frames if p not in stale]
        self.paths: list[Path] = frames[-max_gif_frames:]
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
        _atomic_image_save(img, path, format="PNG")
        self.paths.append(path)
        self.frames = (self.frames + [self._palette(img)])[-self.max_gif_frames:]
        self._write_gif()
        return path

    @staticmethod
    def _palette(img: Image.Image) -> Image.Image:
        return img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)

    def _write_gif(self) -> None:
        first, rest = self.frames[0], self.frames[1:]
        _atomic_image_save(first, self.dir / "train.gif", format="GIF", save_all=True, append_images=rest,
                           duration=self.gif_ms, loop=0)

    def close(self) -> None:
        pass


# Loss-curve layout: margins leave room for the tick labels and the axis titles.
PLOT_LEFT, PLOT_RIGHT, PLOT_TOP, PLOT_BOTTOM = 74, 14, 22, 42
INK = (0, 0, 0)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def _vertical_text(img: Image.Image, text: str, centre: tuple[float, float], font: Any) -> None:
    """Draw ``text`` rotated 90° (reading upwards) centred on ``centre``."""
    probe = ImageDraw.Draw(img)
    w, h = _text_size(probe, text, font)
    label = Image.new("RGB", (w + 2, h + 4), (255, 255, 255))
    ImageDraw.Draw(label).text((1, 0), text, fill=INK, font=font)
    label = label.rotate(90, expand=True)
    img.paste(label, (int(centre[0] - label.width / 2), int(centre[1] - label.height / 2)))


def plot_loss_curve(
    rows: Sequence[dict[str, Any]], path: str | os.PathLike, size: tuple[int, int] = (640, 360), *,
    xlabel: str = "training step", ylabel: str = "loss (nats per character)",
) -> Path:
    """Train loss (thin), its 1/e-EWMA (thick) and validation loss (dots) against the step, with
    labelled axes (ticks at both ends and the middle); written atomically."""
    path = Path(path)
    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = PLOT_LEFT, PLOT_RIGHT, PLOT_TOP, PLOT_BOTTOM
    steps = [r["step"] for r in rows]
    train = [r["loss"] for r in rows]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None and math.isfinite(r["val_loss"])]
    smooth: list[float] = []
    for v in train:
        smooth.append(v if not smooth else (1 - WOLF_C) * smooth[-1] + WOLF_C * v)
    ys = [v for v in train + [v for _, v in val] if math.isfinite(v)]
    draw.rectangle([left, top, w - right, h - bottom], outline=INK)
    tw, th = _text_size(draw, xlabel, font)
    draw.text(((left + w - right - tw) / 2, h - th - 6), xlabel, fill=INK, font=font)
    _vertical_text(img, ylabel, (8, (top + h - bottom) / 2), font)
    if not steps or not ys:
        draw.text((left + 8, top + 8), "no data", fill=INK, font=font)
        _atomic_image_save(img, path, format="PNG")
        return path
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(ys), max(max(ys), min(ys) + 1e-6)

    def pt(sx: float, sy: float) -> tuple[float, float]:
        px = left + (sx - x0) / (x1 - x0) * (w - left - right)
        return px, h - bottom - (sy - y0) / (y1 - y0) * (h - top - bottom)

    for frac in (0.0, 0.5, 1.0):
        yv = y0 + frac * (y1 - y0)
        _, py = pt(x0, yv)
        draw.line([(left - 4, py), (left, py)], fill=INK)
        label = f"{yv:.3f}"
        draw.text((left - 6 - _text_size(draw, label, font)[0], py - 6), label, fill=INK, font=font)
        xv = x0 + frac * (x1 - x0)
        px, _ = pt(xv, y0)
        draw.line([(px, h - bottom), (px, h - bottom + 4)], fill=INK)
        label = f"{xv:.0f}"
        lw = _text_size(draw, label, font)[0]
        draw.text((min(max(px - lw / 2, left - lw / 2), w - right - lw), h - bottom + 6), label, fill=INK, font=font)
    finite = [(s, v) for s, v in zip(steps, train) if math.isfinite(v)]
    if len(finite) >= 2:
        draw.line([pt(s, v) for s, v in finite], fill=(150, 180, 230), width=1)
        draw.line([pt(s, v) for s, v in zip(steps, smooth) if math.isfinite(v)], fill=(20, 60, 200), width=3)
    for s, v in val:
        px, py = pt(s, v)
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(220, 60, 30))
    draw.text((left + 8, 6), "train loss (thin), smoothed (thick), validation (dots)", fill=INK, font=font)
    _atomic_image_save(img, path, format="PNG")
    return path
