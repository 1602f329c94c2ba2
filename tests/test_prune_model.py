"""prune_model: the sequential driver on tiny random MPT, Llama, T5 and Whisper models."""

import copy
import functools

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MptConfig,
    MptForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from sparsekit.blocks import prunable_linears, transformer_blocks, weight_out_in
from sparsekit.masks import is_nm_mask
from sparsekit.prune import magnitude_prune, prune_model

VOCAB = 100


def _ids(g, batch, length):
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def _padded_mask(batch, length):
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length * 2 // 3:] = 0  # right padding on the last sequence
    return mask


def text_batches(padding, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        mask = _padded_mask(3, 16) if padding else torch.ones(3, 16, dtype=torch.long)
        batches.append({"input_ids": _ids(g, 3, 16), "attention_mask": mask})
    return batches


def t5_batches(padding, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return [dict(b, labels=_ids(g, 3, 9)) for b in text_batches(padding, seed)]


def whisper_batches(padding, seed=0):
    g = torch.Generator().manual_seed(seed + 2)
    return [{"input_features": torch.randn(3, 8, 32, generator=g), "decoder_input_ids": _ids(g, 3, 7)}
            for _ in range(2)]


@functools.cache
def _dense(kind):
    torch.manual_seed(0)
    if kind == "mpt":
        config = MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=64,
                           expansion_ratio=2)
        return MptForCausalLM(config).eval()
    if kind == "gpt2":  # Conv1D layers: the weight is stored as [in, out]
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
        return GPT2LMHeadModel(config).eval()
    if kind == "llama":
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
        return LlamaForCausalLM(config).eval()
    if kind == "t5":
        config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          decoder_start_token_id=0, pad_token_id=0)
        return T5ForConditionalGeneration(config).eval()
    config = WhisperConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
                           max_target_positions=32, decoder_start_token_id=1, pad_token_id=0)
    return WhisperForConditionalGeneration(config).eval()


def dense_model(kind):
    return copy.deepcopy(_dense(kind))


BATCHES = {"mpt": text_batches, "llama": text_batches, "gpt2": text_batches, "t5": t5_batches,
           "whisper": whisper_batches}
KINDS = list(BATCHES)


def logits(model, batches):
    with torch.no_grad():
        return [model(**b).logits for b in batches]


def real_positions(kind, batch):
    """Positions whose logits depend on real tokens only (right padding)."""
    if kind in ("mpt", "llama", "gpt2"):
        return batch["attention_mask"].bool()
    return torch.ones(batch["labels" if kind == "t5" else "decoder_input_ids"].shape, dtype=torch.bool)


def output_error(kind, dense, pruned, batches):
    num = den = 0.0
    for d, p, b in zip(logits(dense, batches), logits(pruned, batches), batches):
        keep = real_positions(kind, b)
        num += float((d[keep] - p[keep]).square().sum())
        den += float(d[keep].square().sum())
    return num / den


@pytest.mark.parametrize("kind", KINDS)
def test_reaches_sparsity_in_every_target_and_leaves_the_rest_dense(kind):
    dense, model = dense_model(kind), dense_model(kind)
    report = prune_model(model, BATCHES[kind](padding=True), "sparsegpt", 0.5, progress=False)
    targets = dict(prunable_linears(model))
    assert list(report["layer"]) == list(targets)
    for name, linear in targets.items():
        assert float((linear.weight == 0).float().mean()) == 0.5, name
    assert bool((report["sparsity"] == 0.5).all()) and bool((report["rel_error"].between(0, 1)).all())
    dense_params = dict(dense.named_parameters())
    for name, param in model.named_parameters():
        if name.removesuffix(".weight") not in targets:
            assert torch.equal(param, dense_params[name]), name  # embeddings, LM head, norms, biases


@pytest.mark.parametrize("kind", ["mpt", "t5", "gpt2"])
def test_nm_pattern_in_every_target(kind):
    model = dense_model(kind)
    prune_model(model, BATCHES[kind](padding=True), "sparsegpt", nm=(2, 4), progress=False)
    for name, linear in prunable_linears(model):
        assert is_nm_mask(weight_out_in(linear) != 0, (2, 4)), name  # groups run along the inputs
        assert float((linear.weight == 0).float().mean()) >= 0.5, name


@pytest.mark.parametrize("kind", KINDS)
def test_sparsity_zero_reproduces_the_model(kind):
    batches = BATCHES[kind](padding=True)
    dense, model = dense_model(kind), dense_model(kind)
    report = prune_model(model, batches, "sparsegpt", 0.0, progress=False)
    assert bool((report["rel_error"] < 1e-10).all())
    for d, p, b in zip(logits(dense, batches), logits(model, batches), batches):
        keep = real_positions(kind, b)
        torch.testing.assert_close(p[keep], d[keep], rtol=1e-5, atol=1e-5)


def _block_of(name, blocks):
    return next(i for i, (block_name, _) in enumerate(blocks) if name.startswith(block_name + "."))


@pytest.mark.parametrize("kind", KINDS)
def test_layer_inputs_are_those_of_the_model_with_earlier_blocks_pruned(kind):
    """The driver's statistics equal those of full forwards of the model with the earlier blocks pruned.

    Magnitude pruning does not depend on statistics, so the expected model state before each block is
    known; the report's relative error of every layer is recomputed from inputs captured independently.
    """
    batches = BATCHES[kind](padding=False)
    report = prune_model(dense_model(kind), batches, "magnitude", 0.5, progress=False).set_index("layer")
    model = dense_model(kind)
    blocks = transformer_blocks(model)
    targets = prunable_linears(model)
    for index in range(len(blocks)):
        inputs = {name: [] for name, _ in targets if _block_of(name, blocks) == index}
        hooks = [linear.register_forward_hook(lambda m, x, y, into=inputs[name]: into.append(x[0]))
                 for name, linear in targets if name in inputs]
        with torch.no_grad():
            for batch in batches:
                model(**batch)
        for hook in hooks:
            hook.remove()
        for name, linear in targets:
            if name not in inputs:
                continue
            X = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[name]])
            W = weight_out_in(linear)
            W_pruned = magnitude_prune(W, 0.5)[0]
            expected = float((X @ (W - W_pruned).t()).square().sum() / (X @ W.t()).square().sum())
            assert report.loc[name, "rel_error"] == pytest.approx(expected, rel=1e-3), name
        with torch.no_grad():  # now prune this block, as the driver did before moving on
            for name, linear in targets:
                if name in inputs:
                    weight_out_in(linear).copy_(magnitude_prune(weight_out_in(linear), 0.5)[0])


@pytest.mark.parametrize("kind", ["mpt", "t5", "whisper"])
def test_sparsegpt_beats_wanda_and_magnitude_on_outputs(kind):
    batches = BATCHES[kind](padding=True)
    dense = dense_model(kind)
    errors = {}
    for method in ("sparsegpt", "wanda", "magnitude"):
        model = dense_model(kind)
        prune_model(model, batches, method, 0.5, progress=False)
        errors[method] = output_error(kind, dense, model, batches)
    assert errors["sparsegpt"] < errors["magnitude"], errors
    assert errors["sparsegpt"] < errors["wanda"], errors


@pytest.mark.parametrize("kind", ["mpt", "t5"])
def test_padding_tokens_do_not_enter_the_statistics(kind):
    batches = BATCHES[kind](padding=True)
    other = copy.deepcopy(batches)
    for batch in other:  # different token ids where the attention mask says padding
        pad = batch["attention_mask"] == 0
        batch["input_ids"][pad] = (batch["input_ids"][pad] + 7) % (VOCAB - 1) + 1
    a, b = dense_model(kind), dense_model(kind)
    prune_model(a, batches, "sparsegpt", 0.5, progress=False)
    prune_model(b, other, "sparsegpt", 0.5, progress=False)
    for (name, la), (_, lb) in zip(prunable_linears(a), prunable_linears(b)):
        torch.testing.assert_close(la.weight, lb.weight, rtol=1e-4, atol=1e-5, msg=name)


def test_targets_restrict_pruning():
    model = dense_model("mpt")
    report = prune_model(model, text_batches(True), "wanda", 0.5, targets=["ffn.up_proj"], progress=False)
    assert list(report["layer"]) == ["transformer.blocks.0.ffn.up_proj", "transformer.blocks.1.ffn.up_proj"]
    for name, linear in prunable_linears(model):
        expected = 0.5 if name.endswith("ffn.up_proj") else 0.0
        assert float((linear.weight == 0).float().mean()) == expected, name


def test_deterministic_and_restores_mode_and_cache_setting():
    a, b = dense_model("mpt"), dense_model("mpt")
    a.train()
    a.config.use_cache = True
    ra = prune_model(a, text_batches(True), "sparsegpt", 0.6, progress=False)
    rb = prune_model(b, text_batches(True), "sparsegpt", 0.6, device="cpu", progress=False)
    assert a.training and not b.training and a.config.use_cache and not b.config.use_cache
    assert ra["rel_error"].tolist() == rb["rel_error"].tolist()
    for (_, la), (_, lb) in zip(prunable_linears(a), prunable_linears(b)):
        assert torch.equal(la.weight, lb.weight)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"method": "obs"}, ValueError, "method must be one of"),
        ({"sparsity": 1.2}, ValueError, "sparsity must be in"),
        ({"nm": (2, 3)}, ValueError, "nm.*in_features divisible by m=3"),
        ({"calib_batches": []}, ValueError, "calib_batches must hold at least one batch"),
        ({"calib_batches": {"input_ids": torch.ones(1, 4, dtype=torch.long)}}, TypeError, "calib_batches"),
        ({"calib_batches": [torch.ones(1, 4)]}, TypeError, r"calib_batches\[0\]"),
        ({"targets": ["lm_head"]}, ValueError, "outside the transformer blocks"),
        ({"targets": ["nothing"]}, ValueError, "matches no nn.Linear"),
        ({"quant": "int8"}, TypeError, "quant must be None, a QuantConfig or a dict"),
        ({"nm": (2, 4), "blocksize": 6}, ValueError, "blocksize must be a multiple of m=4"),
        ({"blocksize": 0}, ValueError, "blocksize must be a positive int"),
        ({"blocksize": 64.0}, TypeError, "blocksize must be a positive int"),
        ({"method": "wanda", "blocksize": 64}, TypeError, "method 'wanda' takes no option.*blocksize"),
        ({"method": "magnitude", "scope": "global"}, ValueError, "scope must be one of"),
        ({"targets": "ffn.up_proj"}, TypeError, "targets must be a list of names, not a plain string"),
        ({"calib_batches": None}, ValueError, "calib_batches must be a list of dicts.*'sparsegpt'"),
        ({"percdamp": -0.5}, ValueError, "percdamp must be"),
    ],
)
def test_bad_arguments_raise_before_touching_the_model(kwargs, error, match):
    args = {"calib_batches": text_batches(False), "method": "sparsegpt", "sparsity": 0.5, "progress": False}
    args.update(kwargs)
    model = dense_model("mpt")
    with pytest.raises(error, match=match):
        prune_model(model, **args)
    for (name, param), dense in zip(model.named_parameters(), _dense("mpt").parameters()):
        assert torch.equal(param, dense), name


def test_decoder_positions_without_labels_do_not_enter_the_statistics():
    short = t5_batches(padding=True)
    for batch in short:
        batch["labels"] = batch["labels"][:, :6]
    padded = copy.deepcopy(short)
    for batch in padded:  # three more decoder positions, marked as padding by label -100
        batch["labels"] = torch.cat([batch["labels"], torch.full((3, 3), -100)], dim=1)
    a, b = dense_model("t5"), dense_model("t5")
    prune_model(a, short, "sparsegpt", 0.5, progress=False)
    prune_model(b, padded, "sparsegpt", 0.5, progress=False)
    for (name, la), (_, lb) in zip(prunable_linears(a), prunable_linears(b)):
        torch.testing.assert_close(la.weight, lb.weight, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_magnitude_needs_no_calibration_data_and_runs_no_forward(scope):
    dense, model = dense_model("llama"), dense_model("llama")
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    report = prune_model(model, None, "magnitude", 0.5, scope=scope, progress=False)
    assert not calls  # no forward pass: no statistics, no Hessian
    assert bool(report["rel_error"].isna().all())
    expected = dict(prunable_linears(dense))
    for name, linear in prunable_linears(model):
        assert list(report["layer"]).count(name) == 1
        W = weight_out_in(expected[name])
        assert torch.equal(weight_out_in(linear), magnitude_prune(W, 0.5, scope=scope)[0]), name


def test_magnitude_with_calibration_data_measures_its_error_with_the_same_masks():
    a, b = dense_model("mpt"), dense_model("mpt")
    measured = prune_model(a, text_batches(True), "magnitude", 0.5, scope="layer", progress=False)
    blind = prune_model(b, None, "magnitude", 0.5, scope="layer", progress=False)
    assert bool(measured["rel_error"].between(0, 1).all()) and bool(blind["rel_error"].isna().all())
    for (name, la), (_, lb) in zip(prunable_linears(a), prunable_linears(b)):
        assert torch.equal(la.weight, lb.weight), name


def test_a_new_solver_is_one_table_entry_and_receives_quant_and_its_options(monkeypatch):
    from sparsekit.prune import SOLVERS, Solver

    seen = []

    def halve(W, stats, sparsity, nm, name, quant, strength):
        seen.append((name, stats.tokens, quant, strength))
        return magnitude_prune(W, sparsity, nm)

    monkeypatch.setitem(SOLVERS, "halve", Solver(halve, needs_calibration=True,
                                                 options={"quant": None, "strength": 1}))
    model = dense_model("mpt")
    report = prune_model(model, text_batches(False), "halve", 0.5, quant={"bits": 4}, strength=2,
                         progress=False)
    assert [name for name, *_ in seen] == list(report["layer"]) == [n for n, _ in prunable_linears(model)]
    assert all(tokens > 0 and quant == {"bits": 4} and strength == 2 for _, tokens, quant, strength in seen)
    with pytest.raises(TypeError, match="method 'halve' takes no option.*'scope'.*it takes"):
        prune_model(dense_model("mpt"), text_batches(False), "halve", 0.5, scope="row", progress=False)
