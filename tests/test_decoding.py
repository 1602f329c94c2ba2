"""The KV-cached greedy decoder equals transformers' greedy `generate` on tiny random models."""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MptConfig,
    MptForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from sparsekit.tasks.decoding import greedy_decode, trim_at_eos


def _prompts(left_pad: bool):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 50, (4, 7), generator=gen)
    mask = torch.ones_like(ids)
    cut = slice(0, 3) if left_pad else slice(4, 7)
    ids[1, cut], mask[1, cut] = 0, 0
    return ids, mask


def test_causal_mpt_equals_generate():
    torch.manual_seed(0)
    config = MptConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=2, max_seq_len=64)
    config.pad_token_id, config.eos_token_id = 0, 1
    model = MptForCausalLM(config).eval()
    ids, mask = _prompts(left_pad=True)
    expected = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    got = greedy_decode(model, 10, input_ids=ids, attention_mask=mask)
    assert got.tolist() == expected[:, ids.shape[1] :].tolist()


def test_causal_with_positions_equals_generate():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=32, n_head=4, n_layer=2, n_positions=64)
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, 1, 1
    model = GPT2LMHeadModel(config).eval()
    ids, mask = _prompts(left_pad=True)
    expected = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    got = greedy_decode(model, 10, input_ids=ids, attention_mask=mask)
    assert got.tolist() == expected[:, ids.shape[1] :].tolist()


def test_seq2seq_t5_equals_generate():
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    model = T5ForConditionalGeneration(config).eval()
    ids, mask = _prompts(left_pad=False)
    expected = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    got = greedy_decode(model, 10, input_ids=ids, attention_mask=mask)
    assert got.tolist() == expected[:, 1:].tolist()


def test_seq2seq_whisper_features_equals_forward_argmax():
    """Whisper's `generate` adds task/language logic; compare with step-by-step full forward argmax."""
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=60, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
        max_source_positions=20, max_target_positions=40, decoder_start_token_id=2, pad_token_id=0,
        eos_token_id=1, bos_token_id=2,
    )
    model = WhisperForConditionalGeneration(config).eval()
    features = torch.randn(2, 16, 40)
    start = torch.tensor([[2, 5], [2, 6]])
    got = greedy_decode(model, 10, input_features=features, decoder_start_ids=start)
    seq = start
    with torch.no_grad():
        for _ in range(got.shape[1]):
            nxt = model(input_features=features, decoder_input_ids=seq).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    new = seq[:, 2:]
    for row_got, row_ref in zip(trim_at_eos(got, 1), trim_at_eos(new, 1)):
        assert row_got == row_ref


def test_finished_rows_are_padded_and_trimmed():
    tokens = torch.tensor([[5, 1, 0, 0], [6, 7, 8, 9]])
    assert trim_at_eos(tokens, 1) == [[5], [6, 7, 8, 9]]


def test_bad_max_new_tokens():
    model = MptForCausalLM(MptConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=1, max_seq_len=16))
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(model, 0, input_ids=torch.ones(1, 2, dtype=torch.long), eos_token_id=1)
