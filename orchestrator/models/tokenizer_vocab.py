"""A real CLIP BPE vocabulary, rebuilt from the merges file that ships with open_clip.

CLIP's vocabulary is derived, not stored: the 256 byte symbols, the same symbols with the
end-of-word marker, one token per merge, then the two special tokens (49408 in all). We rebuild it
here so no tokenizer files have to be downloaded. open_clip itself is not imported (it needs
torchvision); only its data file is read.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

#: merges CLIP uses: 49152 BPE entries minus 256 byte symbols minus 2 special tokens
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
MAX_LENGTH = 77
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP mapping of every byte to a printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes, strict=True)}


def find_bpe_file() -> Path:
    """Locate open_clip's gzip'd merges file without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = Path(loc) / _BPE_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{_BPE_FILE} not found: install open_clip_torch (pip install --no-deps open_clip_torch)"
    )


def load_merges(bpe_file: Path | None = None) -> list[tuple[str, str]]:
    path = bpe_file if bpe_file is not None else find_bpe_file()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    selected = lines[1 : NUM_MERGES + 1]
    merges: list[tuple[str, str]] = []
    for line in selected:
        left, right = line.split()
        merges.append((left, right))
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"CLIP vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    return vocab


def write_vocab_files(folder: Path, bpe_file: Path | None = None) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` (the HF CLIP layout) into `folder`."""
    merges = load_merges(bpe_file)
    vocab = build_vocab(merges)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path = folder / "vocab.json"
    merges_path = folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    body = "\n".join(f"{a} {b}" for a, b in merges)
    merges_path.write_text("#version: 0.2\n" + body + "\n", encoding="utf-8")
    return vocab_path, merges_path
