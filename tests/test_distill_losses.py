import pytest
import torch

from sparsekit.distill import block_outputs, ce_loss, kd_loss, shift_labels, squarehead_loss
from sparsekit.distill.losses import SQUAREHEAD_EPS


def _states(layers=3, batch=2, tokens=5, width=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(batch, tokens, width, generator=g) for _ in range(layers)]


def _direct_squarehead(student, teacher, mask):
    """The authors' formula written with explicit sums: Σ_i (Σ m (s−t)² / N) / (Σ m t² / N + ε)."""
    total = 0.0
    m = mask.float()[..., None]
    for s, t in zip(student, teacher):
        n = m.sum() * s.shape[-1]
        total += float(((s - t) ** 2 * m).sum() / n / ((t**2 * m).sum() / n + SQUAREHEAD_EPS))
    return total


def test_squarehead_is_zero_when_student_equals_teacher():
    teacher = _states()
    assert squarehead_loss([h.clone() for h in teacher], teacher).item() == 0.0


def test_squarehead_is_invariant_to_scaling_both():
    student, teacher = _states(seed=1), _states(seed=2)
    base = squarehead_loss(student, teacher, eps=0.0).item()
    scaled = squarehead_loss([7.0 * h for h in student], [7.0 * h for h in teacher], eps=0.0).item()
    assert scaled == pytest.approx(base, rel=1e-5)
    # with the default ε (2^-7) invariance holds up to ε / mean(h_t²) (here mean(h_t²) ≈ 1)
    with_eps = squarehead_loss([7.0 * h for h in student], [7.0 * h for h in teacher]).item()
    assert with_eps == pytest.approx(base, rel=2 * SQUAREHEAD_EPS)


def test_squarehead_ignores_padding_positions():
    student, teacher = _states(seed=1), _states(seed=2)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1, 4:] = False
    before = squarehead_loss(student, teacher, mask).item()
    for h in student + teacher:
        h[~mask] = 1000.0 * torch.randn_like(h[~mask])
    assert squarehead_loss(student, teacher, mask).item() == pytest.approx(before, rel=1e-6)
    assert squarehead_loss(student, teacher).item() != pytest.approx(before, rel=1e-2)


def test_squarehead_sums_layers():
    student, teacher = _states(seed=1), _states(seed=2)
    per_layer = [squarehead_loss([s], [t]).item() for s, t in zip(student, teacher)]
    assert squarehead_loss(student, teacher).item() == pytest.approx(sum(per_layer), rel=1e-6)


def test_squarehead_gradients_reach_only_the_student():
    student = [h.requires_grad_() for h in _states(seed=1)]
    teacher = [h.requires_grad_() for h in _states(seed=2)]
    squarehead_loss(student, teacher).backward()
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in student)
    assert all(h.grad is None for h in teacher)


def test_squarehead_equals_the_direct_formula():
    student, teacher = _states(seed=3, scale=3.0), _states(seed=4, scale=2.0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    expected = _direct_squarehead(student, teacher, mask)
    assert squarehead_loss(student, teacher, mask).item() == pytest.approx(expected, rel=1e-5)


def test_squarehead_per_layer_masks():
    student, teacher = _states(layers=2, seed=5), _states(layers=2, seed=6)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    expected = squarehead_loss(student[:1], teacher[:1]).item() + squarehead_loss(
        student[1:], teacher[1:], mask).item()
    assert squarehead_loss(student, teacher, [None, mask]).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bad", [
    dict(student_hidden=_states(layers=2), teacher_hidden=_states(layers=3)),
    dict(student_hidden=[torch.zeros(2, 5, 4)], teacher_hidden=[torch.zeros(2, 5, 3)]),
    dict(student_hidden=_states(), teacher_hidden=_states(), mask=torch.ones(2, 4)),
    dict(student_hidden=[], teacher_hidden=[]),
])
def test_squarehead_rejects_mismatched_inputs(bad):
    with pytest.raises(ValueError):
        squarehead_loss(**bad)


def test_kd_matches_a_direct_kl():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    labels = torch.tensor([[1, 2, -100, -100], [3, -100, 4, 5]])
    temperature = 2.0
    terms = []
    for b in range(2):
        for t in range(4):
            if labels[b, t] == -100:
                continue
            p_t = torch.softmax(teacher[b, t] / temperature, -1)
            p_s = torch.softmax(student[b, t] / temperature, -1)
            terms.append(float((p_t * (p_t.log() - p_s.log())).sum()))
    expected = temperature**2 * sum(terms) / len(terms)
    assert kd_loss(student, teacher, labels, temperature).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(teacher, teacher, labels, temperature).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature, error", [(0, ValueError), (-1.0, ValueError),
                                                (float("nan"), ValueError), (float("inf"), ValueError),
                                                (True, TypeError)])
def test_kd_rejects_bad_temperature(temperature, error):
    logits = torch.zeros(1, 2, 3)
    with pytest.raises(error, match="temperature"):
        kd_loss(logits, logits, torch.zeros(1, 2, dtype=torch.long), temperature)


def test_ce_and_shift_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g)
    labels = torch.tensor([[-100, 1, 2], [-100, -100, 4]])
    shifted = shift_labels(labels)
    assert shifted.tolist() == [[1, 2, -100], [-100, 4, -100]]
    log_p = logits.log_softmax(-1)
    picked = [log_p[0, 0, 1], log_p[0, 1, 2], log_p[1, 1, 4]]
    assert ce_loss(logits, shifted).item() == pytest.approx(-float(sum(picked)) / 3, rel=1e-5)


def test_block_outputs_drop_embeddings_and_order_encoder_first():
    from transformers.modeling_outputs import BaseModelOutputWithPast, Seq2SeqLMOutput

    h = [torch.full((1, 2, 3), float(i)) for i in range(4)]
    states, stacks = block_outputs(BaseModelOutputWithPast(hidden_states=tuple(h)))
    assert [int(s[0, 0, 0]) for s in states] == [1, 2, 3] and stacks == ["decoder-only"] * 3
    out = Seq2SeqLMOutput(encoder_hidden_states=tuple(h[:3]), decoder_hidden_states=tuple(h[1:]))
    states, stacks = block_outputs(out)
    assert [int(s[0, 0, 0]) for s in states] == [1, 2, 2, 3]
    assert stacks == ["encoder", "encoder", "decoder", "decoder"]
    with pytest.raises(ValueError, match="output_hidden_states"):
        block_outputs(BaseModelOutputWithPast())
