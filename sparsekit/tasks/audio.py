"""Speech synthesis with espeak-ng and Whisper log-mel features.

``synthesize(text, voice)`` runs ``espeak-ng --stdout`` (22.05 kHz, 16-bit WAV), resamples to 16 kHz
with a polyphase filter (``16000/22050 = 320/441``), trims the silence espeak-ng adds around the
utterance, and optionally adds white noise at a signal-to-noise ratio ``snr`` (dB):
``x + n``, ``n ~ N(0, σ²)``, ``σ² = mean(x²) / 10^(snr/10)``.

``log_mel(clips, seconds, n_mels)`` is Whisper's front end on a short window: each clip is padded
(or cut) to ``seconds · 16000`` samples, then a 25 ms / 10 ms STFT, ``n_mels`` mel filters,
``log10``, clamp to 8 decades below the maximum, and ``(x + 4) / 4``; shape
``[clips, n_mels, 100 · seconds]``.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SAMPLE_RATE",
    "MissingSystemPackage",
    "Utterance",
    "require_espeak",
    "synthesize",
    "synthesize_many",
    "log_mel",
    "resample",
]

SAMPLE_RATE = 16_000
ESPEAK_RATE = 22_050
HOP = 160  # samples per mel frame (10 ms)


class MissingSystemPackage(RuntimeError):
    """A Debian package the task needs is not installed."""


def require_espeak() -> str:
    """Path of the ``espeak-ng`` executable; raises ``MissingSystemPackage`` naming the install command."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise MissingSystemPackage(
            "the speech task synthesises Hindi audio with the Debian package 'espeak-ng', which is not "
            "installed (no `espeak-ng` on PATH); install it with `sudo apt-get install -y espeak-ng` "
            "(or `make setup`)"
        )
    return path


@dataclass(frozen=True)
class Utterance:
    """What to say and how: espeak-ng voice ``hi+variant``, speed (words/min), pitch (0–99), noise SNR."""

    text: str
    variant: str
    speed: int = 160
    pitch: int = 50
    snr: float | None = None  # dB; None = clean
    seed: int = 0  # noise seed


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Polyphase resampling of ``x`` from ``src`` Hz to ``dst`` Hz (float32)."""
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(src, dst)
    return resample_poly(x, dst // g, src // g).astype(np.float32)


def _trim(x: np.ndarray, threshold: float = 1e-3) -> np.ndarray:
    loud = np.flatnonzero(np.abs(x) > threshold)
    return x[loud[0] : loud[-1] + 1] if loud.size else x[:0]


def synthesize(utt: Utterance) -> np.ndarray:
    """16 kHz float32 audio ``[samples]`` of ``utt`` (silence trimmed, noise added if ``utt.snr``)."""
    import soundfile as sf

    exe = require_espeak()
    if not 80 <= utt.speed <= 450:
        raise ValueError(f"speed must be in [80, 450] words/min, got {utt.speed}")
    if not 0 <= utt.pitch <= 99:
        raise ValueError(f"pitch must be in [0, 99], got {utt.pitch}")
    cmd = [exe, "-v", f"hi+{utt.variant}", "-s", str(utt.speed), "-p", str(utt.pitch), "--stdout", utt.text]
    wav = subprocess.run(cmd, capture_output=True, check=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    audio = _trim(resample(audio, rate, SAMPLE_RATE))
    if utt.snr is not None and audio.size:
        rng = np.random.default_rng(utt.seed)
        sigma = np.sqrt(np.mean(audio**2) / 10 ** (utt.snr / 10))
        audio = audio + rng.normal(0.0, sigma, audio.shape).astype(np.float32)
    return audio


def synthesize_many(utts: Sequence[Utterance], workers: int = 4, progress: bool = True) -> list[np.ndarray]:
    """``synthesize`` over ``utts`` with ``workers`` concurrent espeak-ng processes, in order."""
    from tqdm.auto import tqdm

    require_espeak()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(
            tqdm(
                pool.map(synthesize, utts),
                total=len(utts),
                disable=not progress,
                desc="espeak-ng",
                mininterval=1.0,
            )
        )


def feature_extractor(seconds: float, n_mels: int):
    """A ``WhisperFeatureExtractor`` with ``n_mels`` filters for ``seconds``-long windows."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=SAMPLE_RATE, hop_length=HOP)
    fe.n_samples = int(round(seconds * SAMPLE_RATE))
    fe.nb_max_frames = fe.n_samples // HOP
    return fe


def log_mel(clips: Sequence[np.ndarray], seconds: float, n_mels: int = 80) -> np.ndarray:
    """Whisper log-mel features ``[len(clips), n_mels, seconds·100]`` (float32) of 16 kHz clips."""
    fe = feature_extractor(seconds, n_mels)
    out = fe(
        [np.asarray(c, dtype=np.float32) for c in clips],
        sampling_rate=SAMPLE_RATE,
        padding="max_length",
        max_length=fe.n_samples,
        truncation=True,
        return_tensors="np",
    )
    return out["input_features"].astype(np.float32)
