import copy

import pytest
import torch
from transformers import MptConfig, MptForCausalLM

from sparsekit.prune.sweep import one_shot_sweep, pattern_label


class TinyTask:
    """The smallest object with the task protocol that a sweep uses.

    Its metric, ``drift``, is the mean squared distance of a model's logits from the teacher's.
    """

    name = "tiny"

    def __init__(self, teacher=None):
        gen = torch.Generator().manual_seed(0)
        self.batches = [{"input_ids": torch.randint(0, 64, (4, 16), generator=gen)} for _ in range(4)]
        self.reference = self._logits(teacher) if teacher is not None else None

    def _logits(self, model):
        with torch.no_grad():
            return [model(**b).logits for b in self.batches]

    def calibration_batches(self, n, batch_size, scale):
        return self.batches

    def student_like(self, model):
        return copy.deepcopy(model)

    def evaluate(self, model, split, limit, scale):
        drift = [float((a - b).pow(2).mean()) for a, b in zip(self._logits(model), self.reference)]
        return {"drift": sum(drift) / len(drift), "n": len(drift)}


def test_sweep_prunes_copies_and_scores_each_pattern():
    torch.manual_seed(0)
    teacher = MptForCausalLM(MptConfig(d_model=64, n_heads=2, n_layers=2, expansion_ratio=2, vocab_size=64))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    results, layers = one_shot_sweep(TinyTask(teacher), teacher, methods=("magnitude", "sparsegpt"),
                                     sparsities=(0.5, 0.9), nms=((2, 4),), progress=False)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items()), "teacher was modified"
    assert list(results.pattern) == ["0%", "50%", "90%", "2:4", "50%", "90%", "2:4"]
    pruned = results[results.method != "dense"]
    assert ((pruned.reached - pruned.sparsity).abs() < 0.02).all()
    by = results.set_index(["method", "pattern"]).drift
    assert by[("dense", "0%")] == 0
    assert by[("magnitude", "90%")] > by[("magnitude", "50%")] > 0  # more zeros, more damage
    assert by[("sparsegpt", "50%")] < by[("magnitude", "50%")]  # the weight update pays off
    assert set(layers.method) == {"magnitude", "sparsegpt"} and layers.rel_error.ge(0).all()


def test_sweep_rejects_unknown_methods_and_bad_patterns():
    with pytest.raises(ValueError, match="methods"):
        one_shot_sweep(TinyTask(), None, methods=("random",))
    with pytest.raises(ValueError, match="sparsity"):
        one_shot_sweep(TinyTask(), None, sparsities=(1.2,))
    assert pattern_label(0.7) == "70%" and pattern_label(nm=(2, 4)) == "2:4"


def test_sweep_skips_nm_patterns_the_model_cannot_take():
    torch.manual_seed(0)
    teacher = MptForCausalLM(MptConfig(d_model=48, n_heads=2, n_layers=1, expansion_ratio=2, vocab_size=64))
    with pytest.warns(UserWarning, match="skipping 16:32"):
        results, _ = one_shot_sweep(TinyTask(teacher), teacher, methods=("magnitude",), sparsities=(),
                                    nms=((2, 4), (16, 32)), progress=False)
    assert list(results.pattern) == ["0%", "2:4"]


def test_sweep_magnitude_is_the_papers_per_layer_baseline_and_the_row_variant_is_available():
    torch.manual_seed(0)
    teacher = MptForCausalLM(MptConfig(d_model=64, n_heads=2, n_layers=2, expansion_ratio=2, vocab_size=64))
    with torch.no_grad():  # rows of very different scales: the two thresholds differ
        for block in teacher.transformer.blocks:
            block.ffn.up_proj.weight.mul_(torch.logspace(-1, 1, block.ffn.up_proj.weight.shape[0])[:, None])
    results, layers = one_shot_sweep(TinyTask(teacher), teacher, methods=("magnitude", "magnitude-row"),
                                     sparsities=(0.5,), progress=False)
    assert list(results.method) == ["dense", "magnitude", "magnitude-row"]
    assert (results[results.method != "dense"].reached - 0.5).abs().max() < 1e-3
    errors = layers.set_index(["method", "layer"]).rel_error
    up = "transformer.blocks.0.ffn.up_proj"
    assert errors[("magnitude", up)] != pytest.approx(errors[("magnitude-row", up)], rel=1e-3)
