"""Local copies of the paper's data sets, and audio decoding without ``torchcodec``.

A local data set is a folder in one of two layouts:

- **data files named by split** (what ``datasets`` infers: ``train.jsonl``, ``test.parquet``,
  ``data/train-00000-of-00001.parquet``, ``validation.csv``, ``dev.json``, ...), e.g. a Parquet copy of a
  hub data set saved with ``Dataset.to_parquet``; an ``Audio`` column in it stays undecoded;
- **Common Voice's own release layout**: ``clips/`` (the audio files) beside ``train.tsv``, ``dev.tsv``
  (our validation) and ``test.tsv`` (columns ``path`` and ``sentence``, tab-separated).

Audio is decoded by :func:`decode_audio` with ``soundfile`` (WAV, FLAC, OGG and, with libsndfile >= 1.1,
MP3 as in Common Voice), mixed down to mono and resampled to 16 kHz by a polyphase filter
(:func:`sparsekit.tasks.audio.resample`): no ``torchcodec`` and no FFmpeg are needed.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

__all__ = ["is_common_voice_dir", "load_local_split", "load_common_voice_split", "undecoded_audio",
           "decode_audio", "COMMON_VOICE_FILES"]

COMMON_VOICE_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}


def is_common_voice_dir(folder: str | Path) -> bool:
    """True for a folder with ``clips/`` and at least one of Common Voice's split files."""
    folder = Path(folder).expanduser()
    return (folder / "clips").is_dir() and any((folder / f).is_file() for f in COMMON_VOICE_FILES.values())


def load_local_split(folder: str | Path, split: str):
    """Split ``split`` (train | validation | test) of a local folder, or ``None`` when it has none."""
    import datasets

    folder = Path(folder).expanduser()
    if split not in COMMON_VOICE_FILES:
        raise ValueError(f"split must be one of {tuple(COMMON_VOICE_FILES)}, got {split!r}")
    if not folder.is_dir():
        raise NotADirectoryError(f"a local data set must be a folder of data files, got {str(folder)!r}")
    if is_common_voice_dir(folder):
        return load_common_voice_split(folder, split)
    splits = datasets.load_dataset(str(folder))
    return splits[split] if split in splits else None


def load_common_voice_split(folder: str | Path, split: str):
    """Rows ``{"path", "sentence", "audio": {"bytes": b"", "path": clips/<path>}}`` of a Common Voice
    release folder's ``train.tsv`` / ``dev.tsv`` / ``test.tsv``; ``None`` when that file is absent."""
    import datasets

    folder = Path(folder).expanduser()
    tsv = folder / COMMON_VOICE_FILES[split]
    if not tsv.is_file():
        return None
    with tsv.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    for column in ("path", "sentence"):
        if rows and column not in rows[0]:
            raise ValueError(f"{tsv} has no {column!r} column (columns: {list(rows[0])})")
    missing = [r["path"] for r in rows if not (folder / "clips" / r["path"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} clips listed in {tsv} are not in {folder / 'clips'}: "
                                f"{missing[:3]}")
    features = datasets.Features({"path": datasets.Value("string"), "sentence": datasets.Value("string"),
                                  "audio": datasets.Audio(decode=False)})
    return datasets.Dataset.from_dict(  # cast, not encoded: encoding an Audio value needs torchcodec
        {"path": [r["path"] for r in rows], "sentence": [r["sentence"] for r in rows],
         "audio": [{"bytes": b"", "path": str(folder / "clips" / r["path"])} for r in rows]},
    ).cast(features)


def undecoded_audio(ds, column: str):
    """``ds`` with its ``Audio`` column left as ``{"bytes", "path"}`` (decoded by :func:`decode_audio`)."""
    import datasets

    feature = ds.features.get(column)
    if isinstance(feature, datasets.Audio) and feature.decode:
        ds = ds.cast_column(column, datasets.Audio(decode=False))
    return ds


def decode_audio(value: dict, sampling_rate: int = 16_000) -> np.ndarray:
    """Mono float32 samples at ``sampling_rate`` Hz of an audio value.

    ``value`` is ``{"array", "sampling_rate"}`` (already decoded) or ``{"bytes", "path"}`` (an encoded file:
    its bytes if not empty, else the file at ``path``).
    """
    import soundfile

    from sparsekit.tasks.audio import resample

    if not isinstance(value, dict):
        raise TypeError(f"an audio value must be a dict, got {type(value).__name__}")
    if value.get("array") is not None:
        samples, rate = np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"])
    elif value.get("bytes") or value.get("path"):
        source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        samples, rate = soundfile.read(source, dtype="float32", always_2d=True)
        samples = samples.mean(axis=1)
    else:
        raise ValueError(f"an audio value needs 'array' + 'sampling_rate', 'bytes' or 'path'; got keys "
                         f"{list(value)}")
    if samples.ndim == 2:  # channels first or last: the shorter axis is the channels
        samples = samples.mean(axis=int(np.argmin(samples.shape)))
    return samples if rate == sampling_rate else resample(samples, rate, sampling_rate)
