"""Character-level corpora: a text file, tiny-shakespeare (downloaded once, cached), or the embedded
default — CPython's pydoc topics (~465 KB of English), which needs no network."""

from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from tapetransformer.fileio import atomic_write

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DEFAULT_CACHE_DIR = Path(os.environ.get("TAPETRANSFORMER_CACHE", Path.home() / ".cache" / "tapetransformer"))


def embedded_corpus() -> str:
    """The pydoc topics shipped with CPython, in a fixed (sorted-key) order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


class DownloadError(OSError):
    """A corpus could not be downloaded (offline, blocked, or the server failed)."""


def download_tiny_shakespeare(
    cache_dir: str | os.PathLike | None = None, url: str = TINY_SHAKESPEARE_URL, timeout: float = 60.0
) -> Path:
    """Return the path of tiny-shakespeare, downloading it on first use.

    The download goes to a temp file in the cache directory and is renamed into place, so an
    interrupted download never leaves a truncated corpus behind. Raises :class:`DownloadError`
    naming the URL when it cannot be fetched.
    """
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    target = cache / "tinyshakespeare.txt"
    if target.is_file() and target.stat().st_size > 0:
        return target

    def copy(out: BinaryIO) -> None:
        n = 0
        while chunk := resp.read(1 << 16):
            out.write(chunk)
            n += len(chunk)
        if n == 0:
            raise DownloadError(f"empty download from {url}")

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            atomic_write(target, copy)
    except DownloadError:
        raise
    except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors; a malformed URL a ValueError
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"could not download tiny-shakespeare from {url} ({reason}); without network access, "
                            "pass a local copy with --data FILE (data=FILE in Python)") from None
    return target


def load_text(data: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> str:
    """``None`` or ``"embedded"``: the pydoc corpus; ``"shakespeare"``: tiny-shakespeare; else a UTF-8 file."""
    if data is None or str(data) == "embedded":
        return embedded_corpus()
    if str(data) == "shakespeare":
        return download_tiny_shakespeare(cache_dir).read_text(encoding="utf-8")
    path = Path(data)
    if path.is_dir():
        raise ValueError(f"corpus {path} is a directory, not a text file")
    if not path.is_file():
        raise FileNotFoundError(f"no corpus file at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        bad = e.object[e.start]
        raise ValueError(f"corpus {path} is not UTF-8 text (byte {bad:#04x} at offset {e.start})") from None
    if len(text) < 2:
        raise ValueError(f"corpus {path} has fewer than 2 characters")
    return text


@dataclass(frozen=True)
class CharVocab:
    """Sorted distinct characters; ids are positions in ``chars``."""

    chars: str

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        return cls("".join(sorted(set(text))))

    def __post_init__(self) -> None:
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("vocabulary characters must be distinct")

    @property
    def size(self) -> int:
        return len(self.chars)

    @property
    def stoi(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> list[int]:
        table = self.stoi
        try:
            return [table[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary ({self.size} characters)") from None

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        bad = [i for i in ids if not 0 <= i < self.size]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range [0, {self.size})")
        return "".join(self.chars[i] for i in ids)


class CharDataset:
    """A corpus as one long id tensor, split into train (first ``1 - val_fraction``) and val."""

    def __init__(self, text: str, vocab: CharVocab | None = None, val_fraction: float = 0.1) -> None:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.vocab = vocab or CharVocab.from_text(text)
        self.data = torch.tensor(self.vocab.encode(text), dtype=torch.long)
        n_val = int(len(self.data) * val_fraction)
        self.train = self.data[: len(self.data) - n_val]
        self.val = self.data[len(self.data) - n_val :]

    def split(self, name: str) -> torch.Tensor:
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val

    def get_batch(
        self, split: str, batch_size: int, seq_len: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x (B, S) and the next-character targets y (B, S)."""
        data = self.split(split)
        if len(data) < seq_len + 2:
            raise ValueError(f"{split} split has {len(data)} tokens; need at least seq_len + 2 = {seq_len + 2}")
        ix = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        offs = torch.arange(seq_len)
        x = data[ix[:, None] + offs]
        y = data[ix[:, None] + offs + 1]
        return x, y
