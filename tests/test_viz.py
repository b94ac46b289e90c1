"""The attention framebuffer and the loss curve (Pillow)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image, ImageStat  # noqa: E402

from tapetransformer.model import TapeTransformer  # noqa: E402
from tapetransformer.viz import FrameWriter, frame_size, plot_loss_curve, render_frame, weight_colour  # noqa: E402

VOCAB = "abcdefghij ,.\n"


def tiny_attention(rows: int = 3, seq: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = TapeTransformer(len(VOCAB), seq_len=seq, embed_dim=16, num_heads=2, dropout=0.0, backend="eager").train()
    x = torch.randint(0, len(VOCAB), (rows, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, _, attn = model(x, need_aux=True)
    return x, attn


def test_render_frame_from_tiny_model() -> None:
    x, attn = tiny_attention()
    assert attn.shape == x.shape
    chars = ["".join(VOCAB[i] for i in row) for row in x.tolist()]
    img = render_frame(chars, attn, [3.0, 2.9, 2.7, 2.8, 2.5], smoothed=2.7, step=5)
    assert img.size == frame_size(3, 12) == (2 * 6 + 12 * 8, 2 * 6 + 3 * 14 + 48)
    stat = ImageStat.Stat(img)
    assert max(stat.stddev) > 10  # not blank
    # each character cell is filled with its weight's colour: the row's most- and least-attended
    # characters get the two ends of the ramp
    for r in range(3):
        hi, lo = int(attn[r].argmax()), int(attn[r].argmin())
        y = 6 + r * 14 + 12  # the cell's bottom rows, below the glyph
        assert img.getpixel((6 + hi * 8, y)) == weight_colour(1.0)
        assert img.getpixel((6 + lo * 8, y)) == weight_colour(0.0)
    assert len({weight_colour(w / 10) for w in range(11)}) == 11


def test_render_frame_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="rows, S"):
        render_frame(["abc", "def"], torch.rand(2, 4), [1.0], 1.0, 1)
    with pytest.raises(ValueError, match="rows, S"):
        render_frame(["abc"], torch.rand(2, 3), [1.0], 1.0, 1)


def test_frame_writer_pngs_gif_and_smoothed_loss(tmp_path: Path) -> None:
    x, attn = tiny_attention(rows=2, seq=10)
    fw = FrameWriter(tmp_path / "viz", VOCAB)
    for step, loss in enumerate([4.0, 3.0, 2.0], start=1):
        fw.observe(step, loss)
    c = 0.367879441
    want = (1 - c) * ((1 - c) * 4.0 + c * 3.0) + c * 2.0
    assert math.isclose(fw.smoothed, want, rel_tol=1e-12)
    p1 = fw.frame(3, x, attn)
    fw.observe(4, 1.5)
    fw.frame(4, x, attn * 0 + torch.linspace(0, 1, 10))
    assert p1.name == "frame_000003.png" and Image.open(p1).size == frame_size(2, 10)
    gif = Image.open(tmp_path / "viz" / "train.gif")
    assert gif.n_frames == 2 and gif.size == frame_size(2, 10)
    assert not [p for p in (tmp_path / "viz").iterdir() if p.name.startswith(".")]  # no temp files left
    resumed = FrameWriter(tmp_path / "viz", VOCAB)  # a resumed run appends to the GIF
    resumed.frame(6, x, attn)
    assert Image.open(tmp_path / "viz" / "train.gif").n_frames == 3


def test_loss_curve_png(tmp_path: Path) -> None:
    rows = [{"step": i, "loss": 4.0 / i, "val_loss": (4.2 / i if i % 5 == 0 else None)} for i in range(1, 31)]
    path = plot_loss_curve(rows, tmp_path / "loss.png")
    img = Image.open(path).convert("RGB")
    assert img.size == (640, 360)
    px = torch.from_numpy(np.asarray(img).copy()).reshape(-1, 3)
    smooth_px = int((px == torch.tensor([20, 60, 200], dtype=torch.uint8)).all(dim=1).sum())
    val_px = int((px == torch.tensor([220, 60, 30], dtype=torch.uint8)).all(dim=1).sum())
    assert smooth_px > 300 and val_px > 6 * 20  # the thick smoothed curve and 6 validation dots are drawn
    assert max(ImageStat.Stat(img).stddev) > 10
    assert Image.open(plot_loss_curve([], tmp_path / "empty.png")).size == (640, 360)
