"""MosaicML MPT checkpoints (remote-code ``config.json``) loaded with transformers' own ``MptForCausalLM``.

The paper's GSM8K teacher (``neuralmagic/mpt-7b-gsm8k-pt``) is a MosaicML checkpoint: its config names
remote code (``auto_map``) and carries fields that only that code reads (``init_config``,
``tokenizer_name``, ``verbose``, ...). It is loaded here without ``trust_remote_code``:

- **config**: the fields transformers' ``MptConfig`` declares are kept, the remote-code-only ones dropped;
  a checkpoint using a feature transformers' MPT does not implement (no ALiBi, learned position embeddings
  without ALiBi, biases, QK layer norm, prefix LM, multi-query attention, a logit scale, an ALiBi maximum
  other than 8) is refused with a ``ValueError`` naming the field, instead of loading a different model;
- **weights**: MosaicML's names (``transformer.wte``, ``transformer.blocks.N.norm_1``,
  ``transformer.blocks.N.attn.Wqkv``, ``transformer.blocks.N.attn.out_proj``, ``transformer.blocks.N.norm_2``,
  ``transformer.blocks.N.ffn.up_proj``, ``transformer.blocks.N.ffn.down_proj``, ``transformer.norm_f``) are
  the names of transformers' MPT (whose LM head is tied to ``transformer.wte``). :data:`KEY_MAPPING` maps
  the one other spelling seen in MosaicML's code (``model.``-prefixed composer state); the load checks
  that every checkpoint tensor is used and every model weight is loaded, so a checkpoint with other names
  fails loudly rather than leaving random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["KEY_MAPPING", "mpt_config", "load_mpt", "clean_config"]

# regex -> replacement, applied by transformers' from_pretrained(key_mapping=...) to checkpoint names
KEY_MAPPING = {r"^model\.transformer\.": "transformer."}

_ATTN_FIELDS = ("attn_type", "attn_pdrop", "attn_impl", "clip_qkv", "softmax_scale", "prefix_lm", "qk_ln",
                "attn_uses_sequence_id", "alibi", "alibi_bias_max")
_FIELDS = ("d_model", "n_heads", "n_layers", "expansion_ratio", "max_seq_len", "vocab_size", "resid_pdrop",
           "layer_norm_epsilon", "emb_pdrop", "learned_pos_emb", "init_device", "logit_scale", "no_bias",
           "embedding_fraction", "norm_type", "use_cache", "initializer_range", "tie_word_embeddings",
           "pad_token_id", "bos_token_id", "eos_token_id", "torch_dtype", "dtype", "architectures")
# field -> the value transformers' MPT implements (others are refused)
_REQUIRED_ATTN = {"alibi": True, "qk_ln": False, "prefix_lm": False, "attn_type": "multihead_attention",
                  "alibi_bias_max": 8}
_REQUIRED = {"no_bias": True, "logit_scale": None}


def clean_config(raw: dict):
    """``MptConfig`` from a MosaicML (or transformers) MPT ``config.json`` dict; see the module docstring."""
    from transformers import MptConfig

    if raw.get("model_type", "mpt") != "mpt":
        raise ValueError(f"config model_type must be 'mpt', got {raw.get('model_type')!r}")
    attn = {k: v for k, v in (raw.get("attn_config") or {}).items() if k in _ATTN_FIELDS}
    for field, needed in _REQUIRED_ATTN.items():
        if field in attn and attn[field] != needed:
            raise ValueError(f"attn_config.{field}={attn[field]!r} is not implemented by transformers' MPT "
                             f"(it needs {needed!r}); this checkpoint needs MosaicML's remote code")
    for field, needed in _REQUIRED.items():
        if field in raw and raw[field] != needed:
            raise ValueError(f"{field}={raw[field]!r} is not implemented by transformers' MPT (it needs "
                             f"{needed!r}); this checkpoint needs MosaicML's remote code")
    kept = {k: v for k, v in raw.items() if k in _FIELDS}
    kept["architectures"] = ["MptForCausalLM"]
    return MptConfig(**kept, attn_config=attn)


def _config_dict(source: str, **hub_kwargs) -> dict:
    path = Path(source).expanduser()
    if path.is_dir():
        return json.loads((path / "config.json").read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(source, "config.json", **hub_kwargs)).read_text())


def mpt_config(source: str, local_files_only: bool = False):
    """The cleaned ``MptConfig`` of a local folder or hub id."""
    return clean_config(_config_dict(source, local_files_only=local_files_only))


def load_mpt(source: str, local_files_only: bool = False, **kwargs):
    """``MptForCausalLM`` from a MosaicML or transformers MPT checkpoint (folder or hub id), all weights
    used."""
    from transformers import MptForCausalLM

    config = mpt_config(source, local_files_only=local_files_only)
    model, info = MptForCausalLM.from_pretrained(
        source, config=config, key_mapping=KEY_MAPPING, output_loading_info=True,
        local_files_only=local_files_only, **kwargs,
    )
    missing = set(info["missing_keys"]) - {"lm_head.weight"}  # tied to transformer.wte
    unexpected = set(info["unexpected_keys"])
    if missing or unexpected or info.get("mismatched_keys"):
        raise ValueError(f"the MPT checkpoint {source!r} does not match transformers' MptForCausalLM: "
                         f"missing "
                         f"{sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}, mismatched "
                         f"{list(info.get('mismatched_keys') or [])[:8]}")
    return model
