"""Tiny stand-ins for the paper's models and data sets, saved to disk as the hub would hand them over.

- ``t5/``: a random T5 (``save_pretrained``) with a word-level tokenizer; ``wmt/``: WMT14-style jsonl
  (``{"translation": {"de", "en"}}``) with train/validation/test files.
- ``mpt/``: a random MPT saved under MosaicML's remote-code names and ``config.json`` (``auto_map``,
  ``init_config``, no ``lm_head``), with a byte-level BPE tokenizer without a pad token (as GPT-NeoX's);
  ``gsm8k/``: GSM8K-style Parquet (``question``, ``answer`` ending in ``#### N``), train and test only.
- ``whisper/``: a random Whisper with a ``WhisperTokenizer`` (Whisper's special tokens, Hindi language
  token), a feature extractor with a 1 s window, and ``suppress_tokens``/``begin_suppress_tokens`` in its
  generation config; ``cv_parquet/``: Parquet with an ``Audio`` column (WAV bytes at 8 kHz);
  ``cv_layout/``: Common Voice's release layout (``clips/*.mp3`` + ``train.tsv``/``dev.tsv``/``test.tsv``).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import torch

WORDS_EN = "the dog cat sees a big small house tree runs eats".split()
WORDS_DE = "der Hund Katze sieht ein grosse kleine Haus Baum rennt isst".split()
HINDI = "शून्य एक दो तीन चार पाँच छह सात आठ नौ".split()
MOSAIC_CONFIG_EXTRAS = {  # fields of MosaicML's remote-code config that transformers' MptConfig lacks
    "auto_map": {
        "AutoConfig": "configuration_mpt.MPTConfig",
        "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM",
    },
    "init_config": {
        "name": "kaiming_normal_",
        "fan_mode": "fan_in",
        "init_nonlinearity": "relu",
        "init_std": 0.02,
    },
    "tokenizer_name": "EleutherAI/gpt-neox-20b",
    "verbose": 0,
}


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ---- translation ----------------------------------------------------------------------------------
def build_translation(root: Path) -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    rng = random.Random(0)
    pairs = []
    while len(pairs) < 40:
        idx = [rng.randrange(len(WORDS_EN)) for _ in range(rng.randint(2, 5))]
        pair = {
            "en": " ".join(WORDS_EN[i] for i in idx) + ".",
            "de": " ".join(WORDS_DE[i] for i in idx) + ".",
        }
        if pair not in pairs:
            pairs.append(pair)
    data = root / "wmt"
    for split, chunk in (("train", pairs[:28]), ("validation", pairs[28:34]), ("test", pairs[34:])):
        _jsonl(data / f"{split}.jsonl", [{"translation": p} for p in chunk])

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.train_from_iterator(
        ["translate English to German:"] + [t for p in pairs for t in p.values()],
        trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]),
    )
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            dropout_rate=0.0,
        )
    )
    model.save_pretrained(root / "t5")
    tokenizer.save_pretrained(root / "t5")
    return {"model": str(root / "t5"), "dataset": str(data)}


# ---- math -------------------------------------------------------------------------------------------
def gsm8k_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        rows.append(
            {
                "question": f"Ann has {a} apples and gets {b} more. How many apples does she have?",
                "answer": f"She has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
            }
        )
    return rows


def save_mosaic_mpt(model, folder: Path) -> None:
    """Save ``model`` (transformers' MptForCausalLM) as MosaicML would: remote-code config, no lm_head."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config
    config = {
        "architectures": ["MPTForCausalLM"],
        "model_type": "mpt",
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_layers": cfg.n_layers,
        "expansion_ratio": 4,
        "max_seq_len": cfg.max_seq_len,
        "vocab_size": cfg.vocab_size,
        "resid_pdrop": 0,
        "emb_pdrop": 0,
        "learned_pos_emb": True,
        "logit_scale": None,
        "no_bias": True,
        "embedding_fraction": 1.0,
        "norm_type": "low_precision_layernorm",
        "init_device": "cpu",
        "use_cache": False,
        "torch_dtype": "float32",
        "transformers_version": "4.34.1",
        "attn_config": {
            "alibi": True,
            "alibi_bias_max": 8,
            "attn_impl": "triton",
            "attn_pdrop": 0,
            "attn_type": "multihead_attention",
            "attn_uses_sequence_id": False,
            "clip_qkv": None,
            "prefix_lm": False,
            "qk_ln": False,
            "softmax_scale": None,
        },
        **MOSAIC_CONFIG_EXTRAS,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))


def build_math(root: Path) -> dict:
    import pandas as pd
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MptConfig, MptForCausalLM, PreTrainedTokenizerFast

    data = root / "gsm8k"
    data.mkdir(parents=True, exist_ok=True)
    train, test = gsm8k_rows(40, 1), gsm8k_rows(6, 2)
    pd.DataFrame(train).to_parquet(data / "train.parquet")
    pd.DataFrame(test).to_parquet(data / "test.parquet")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in train + test],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    model = MptForCausalLM(
        MptConfig(
            d_model=16,
            n_heads=2,
            n_layers=2,
            max_seq_len=512,  # room for a prompt beside lm-eval's 256 new tokens
            vocab_size=len(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    save_mosaic_mpt(model, root / "mpt")
    tokenizer.save_pretrained(root / "mpt")
    return {"model": str(root / "mpt"), "dataset": str(data), "reference": model}


# ---- speech -----------------------------------------------------------------------------------------
def whisper_tokenizer(folder: Path):
    """A byte-level ``WhisperTokenizer`` with Whisper's special tokens (every language token, in order)."""
    from tokenizers import pre_tokenizers
    from transformers import AddedToken, WhisperTokenizer
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab["<|endoftext|>"] = len(vocab)
    tok = WhisperTokenizer(vocab=vocab, merges=[])
    specials = (
        ["<|startoftranscript|>"]
        + [f"<|{code}|>" for code in LANGUAGES]
        + [
            "<|translate|>",
            "<|transcribe|>",
            "<|startoflm|>",
            "<|startofprev|>",
            "<|nocaptions|>",
            "<|notimestamps|>",
        ]
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    tok.save_pretrained(folder)
    return WhisperTokenizer.from_pretrained(folder)


def tone(seconds: float, rate: int, freq: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.01, t.size)
    return (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def _wav_bytes(samples: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt)
    return buf.getvalue()


def _speech_rows(n: int, seed: int) -> list[tuple[str, np.ndarray]]:
    rng = random.Random(seed)
    return [
        (
            " ".join(rng.choice(HINDI) for _ in range(rng.randint(1, 3))),
            tone(rng.uniform(0.4, 0.9), 8000, rng.uniform(200, 800), seed * 100 + i),
        )
        for i in range(n)
    ]


def build_speech(root: Path) -> dict:
    import datasets
    import soundfile
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    sizes = {"train": 12, "validation": 4, "test": 4}
    parquet = root / "cv_parquet"
    parquet.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"audio": datasets.Audio(), "sentence": datasets.Value("string")})
    layout = root / "cv_layout"
    (layout / "clips").mkdir(parents=True, exist_ok=True)
    for i, (split, n) in enumerate(sizes.items()):
        rows = _speech_rows(n, i + 1)
        ds = datasets.Dataset.from_dict(  # cast, not encoded: encoding an Audio value needs torchcodec
            {
                "audio": [
                    {"bytes": _wav_bytes(x, 8000), "path": f"{split}{j}.wav"} for j, (_, x) in enumerate(rows)
                ],
                "sentence": [text for text, _ in rows],
            }
        ).cast(features)
        ds.to_parquet(str(parquet / f"{split}.parquet"))
        lines = ["client_id\tpath\tsentence\tup_votes"]
        for j, (text, x) in enumerate(rows):
            name = f"common_voice_hi_{split}{j}.mp3"
            soundfile.write(layout / "clips" / name, np.repeat(x, 6), 48000, format="MP3")  # CV: 48 kHz MP3
            lines.append(f"c{j}\t{name}\t{text}\t2")
        tsv = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}[split]
        (layout / tsv).write_text("\n".join(lines) + "\n", encoding="utf-8")

    folder = root / "whisper"
    tokenizer = whisper_tokenizer(folder)
    WhisperFeatureExtractor(feature_size=80, chunk_length=1).save_pretrained(folder)
    sot, eot = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|endoftext|>"])
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(
        WhisperConfig(
            vocab_size=len(tokenizer),
            num_mel_bins=80,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_source_positions=50,
            max_target_positions=24,
            pad_token_id=eot,
            bos_token_id=eot,
            eos_token_id=eot,
            decoder_start_token_id=sot,
            suppress_tokens=None,
            begin_suppress_tokens=None,
        )
    )
    model.generation_config.suppress_tokens = [tokenizer.convert_tokens_to_ids("<|nocaptions|>")]
    model.generation_config.begin_suppress_tokens = [eot]
    model.save_pretrained(folder)
    return {"model": str(folder), "dataset": str(parquet), "layout": str(layout)}


def build_all(root: Path) -> dict:
    root = Path(root)
    return {"translation": build_translation(root), "math": build_math(root), "speech": build_speech(root)}
