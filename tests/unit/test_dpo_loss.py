"""DPO maths against numbers worked out by hand: sequence log-probs, sigmoid/cDPO/IPO losses."""

from __future__ import annotations

import math

import pytest
import torch

from fedit.client.dpo import dpo_loss, preference_scores, sequence_logps

# Two pairs of fixed sequence log-probs:
#   pair 1: π_c = -10, π_r = -12, ref_c = -11, ref_r = -11  →  h = (-10 + 12) - (-11 + 11) = 2
#   pair 2: π_c =  -8, π_r =  -6, ref_c =  -9, ref_r =  -8  →  h = (-8 + 6) - (-9 + 8)   = -1
POLICY_CHOSEN = torch.tensor([-10.0, -8.0])
POLICY_REJECTED = torch.tensor([-12.0, -6.0])
REF_CHOSEN = torch.tensor([-11.0, -9.0])
REF_REJECTED = torch.tensor([-11.0, -8.0])
LOGPS = (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)


def test_sigmoid_loss_matches_hand_computation() -> None:
    out = dpo_loss(*LOGPS, beta=0.1)
    # pair 1: -log σ(0.1 · 2)  = log(1 + e^-0.2) = log(1.818730753) = 0.598138869
    # pair 2: -log σ(0.1 · -1) = log(1 + e^0.1)  = log(2.105170918) = 0.744396660
    # mean: (0.598138869 + 0.744396660) / 2 = 0.671267765
    assert out.loss.item() == pytest.approx(0.671267765, abs=1e-6)


def test_label_smoothing_matches_hand_computation() -> None:
    out = dpo_loss(*LOGPS, beta=0.1, label_smoothing=0.2)
    # pair 1: 0.8 · -log σ(0.2) + 0.2 · -log σ(-0.2) = 0.8 · 0.598138869 + 0.2 · 0.798138869
    #       = 0.478511095 + 0.159627774 = 0.638138869
    # pair 2: 0.8 · -log σ(-0.1) + 0.2 · -log σ(0.1) = 0.8 · 0.744396660 + 0.2 · 0.644396660
    #       = 0.595517328 + 0.128879332 = 0.724396660
    # mean: (0.638138869 + 0.724396660) / 2 = 0.681267765
    assert out.loss.item() == pytest.approx(0.681267765, abs=1e-6)


def test_ipo_loss_matches_hand_computation() -> None:
    # β = 0.1 → target 1 / (2 · 0.1) = 5; pair 1: (2 - 5)² = 9; pair 2: (-1 - 5)² = 36
    # mean: (9 + 36) / 2 = 22.5
    assert dpo_loss(*LOGPS, beta=0.1, loss_type="ipo").loss.item() == pytest.approx(22.5)
    # β = 0.5 → target 1; (2 - 1)² = 1, (-1 - 1)² = 4; mean 2.5
    assert dpo_loss(*LOGPS, beta=0.5, loss_type="ipo").loss.item() == pytest.approx(2.5)


def test_rewards_accuracy_and_margin() -> None:
    out = dpo_loss(*LOGPS, beta=0.1)
    # chosen rewards:   0.1 · (-10 + 11) = 0.1,  0.1 · (-8 + 9) = 0.1
    # rejected rewards: 0.1 · (-12 + 11) = -0.1, 0.1 · (-6 + 8) = 0.2
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.1])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.2])
    # pair 1 ranks chosen higher, pair 2 does not → accuracy 1/2
    assert out.accuracy.item() == pytest.approx(0.5)
    # margins 0.2 and -0.1 → mean 0.05
    assert out.margin.item() == pytest.approx(0.05)


def test_loss_has_gradient_and_statistics_are_detached() -> None:
    policy_chosen = POLICY_CHOSEN.clone().requires_grad_()
    out = dpo_loss(policy_chosen, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1)
    out.loss.backward()
    # d/dπ_c of -log σ(β·h) / B = -β · σ(-β·h) / B
    expected = [-0.1 * (1 / (1 + math.exp(0.2))) / 2, -0.1 * (1 / (1 + math.exp(-0.1))) / 2]
    assert policy_chosen.grad.tolist() == pytest.approx(expected)
    assert not out.chosen_rewards.requires_grad


def test_equal_policy_and_reference_gives_log_two() -> None:
    # h = 0 for every pair → -log σ(0) = log 2, whatever β
    out = dpo_loss(REF_CHOSEN, REF_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.3)
    assert out.loss.item() == pytest.approx(math.log(2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "hinge"}, "unknown DPO loss_type"),
        ({"beta": 0.0}, "beta"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "IPO"),
    ],
)
def test_invalid_settings_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dpo_loss(*LOGPS, **kwargs)


def test_mismatched_shapes_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED[:1], REF_CHOSEN, REF_REJECTED)


def test_sequence_logps_matches_manual_gather_with_masking() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    labels = torch.tensor(
        [
            [-100, -100, 3, 4, 1],  # prompt of 2, response of 3
            [-100, 2, 6, -100, -100],  # response of 2, then padding
            [-100, -100, -100, -100, 0],  # a single response token
        ]
    )
    log_probs = torch.log_softmax(logits, dim=-1)
    expected = torch.zeros(3)
    for n in range(3):
        for t in range(1, 5):  # logits at t - 1 predict the label at t
            if labels[n, t] != -100:
                expected[n] += log_probs[n, t - 1, labels[n, t]]
    assert torch.allclose(sequence_logps(logits, labels), expected, atol=1e-6)


def test_sequence_logps_is_zero_for_fully_masked_rows_and_keeps_gradient() -> None:
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.tensor([[-100] * 4, [-100, 1, 2, 3]])
    out = sequence_logps(logits, labels)
    assert out.shape == (2,)
    assert out[0].item() == 0.0
    out.sum().backward()
    assert logits.grad is not None and logits.grad[0].abs().sum() == 0


def test_sequence_logps_computes_half_precision_in_float32() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 4, 5]])
    half = sequence_logps(logits.bfloat16(), labels)
    assert half.dtype == torch.float32
    assert torch.allclose(half, sequence_logps(logits.bfloat16().float(), labels))


def test_sequence_logps_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="do not match"):
        sequence_logps(torch.zeros(2, 4, 5), torch.zeros(2, 3, dtype=torch.long))


def test_preference_scores_match_hand_computation() -> None:
    # rewards β·(π − ref), β = 0.5, (chosen, rejected) per pair:
    #   pair a (cat x): (0.5·(-10 + 11), 0.5·(-12 + 11)) = ( 0.5, -0.5) → margin  1.0, right
    #   pair b (cat x): (0.5·(-8 + 9),   0.5·(-6 + 8))   = ( 0.5,  1.0) → margin -0.5, wrong
    #   pair c (cat y): (0,              0)              → margin 0, a tie counts as wrong
    policy = torch.tensor([[-10.0, -12.0], [-8.0, -6.0], [-5.0, -7.0]])
    reference = torch.tensor([[-11.0, -11.0], [-9.0, -8.0], [-5.0, -7.0]])
    scores = preference_scores(policy, reference, ["x", "x", "y"], beta=0.5)
    assert list(scores) == ["overall", "x", "y"]
    assert scores["x"] == pytest.approx(
        {"accuracy": 0.5, "margin": 0.25, "chosen_reward": 0.5, "rejected_reward": 0.25, "pairs": 2}
    )
    assert scores["y"]["accuracy"] == 0.0 and scores["y"]["margin"] == 0.0
    assert scores["overall"]["accuracy"] == pytest.approx(1 / 3)
    assert scores["overall"]["margin"] == pytest.approx((1.0 - 0.5 + 0.0) / 3)
    with pytest.raises(ValueError, match="expected two"):
        preference_scores(policy, reference[:2], ["x", "x", "y"], beta=0.5)
