"""Losses against hand-computed values and closed-form gradients.

Expected numbers are written out with `math` from the formulas in REFERENCE §2
and §5 (and TRL's definitions), never by calling the function under test.
"""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sacpo_jax import losses


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def softplus(x):
    """log(1 + e^x) = -log sigmoid(-x)."""
    return math.log1p(math.exp(x))


# Two pairs. Pair 0: chosen log-ratio -10 - (-11) = 1, rejected -12 - (-11.5) = -0.5,
# delta = 1.5. Pair 1: chosen -20 - (-19) = -1, rejected -18 - (-18.5) = 0.5, delta = -1.5.
PI_C = np.array([-10.0, -20.0])
PI_R = np.array([-12.0, -18.0])
REF_C = np.array([-11.0, -19.0])
REF_R = np.array([-11.5, -18.5])
DELTAS = [1.5, -1.5]
BETA = 0.1


def dpo(loss_type="sigmoid", beta=BETA, **kwargs):
    return losses.dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=beta, loss_type=loss_type, **kwargs)


def test_sigmoid_dpo_matches_hand_values():
    got, _, _ = dpo("sigmoid")
    # -log sigmoid(beta*delta) = log(1 + exp(-beta*delta))
    want = [math.log1p(math.exp(-0.15)), math.log1p(math.exp(0.15))]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_cdpo_label_smoothing_matches_trl_formula():
    eps = 0.1
    got, _, _ = dpo("sigmoid", label_smoothing=eps)
    # TRL: -(1-eps) log sigmoid(b d) - eps log sigmoid(-b d)
    want = [(1 - eps) * softplus(-bd) + eps * softplus(bd) for bd in (0.15, -0.15)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # pair 0 by hand: 0.9 * log(1 + e^-0.15) + 0.1 * log(1 + e^0.15), ln(1.8607080) = 0.6209570
    assert float(got[0]) == pytest.approx(0.9 * 0.6209570 + 0.1 * 0.7709570, rel=1e-6)


def test_robust_dpo_matches_trl_formula():
    eps = 0.2
    got, _, _ = dpo("robust", label_smoothing=eps)
    # [-(1-eps) log sigmoid(b d) + eps log sigmoid(-b d)] / (1 - 2 eps)
    want = [
        ((1 - eps) * softplus(-bd) - eps * softplus(bd)) / (1 - 2 * eps) for bd in (0.15, -0.15)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_robust_without_smoothing_is_plain_dpo():
    robust, _, _ = dpo("robust", label_smoothing=0.0)
    plain = [math.log1p(math.exp(-0.15)), math.log1p(math.exp(0.15))]
    np.testing.assert_allclose(robust, plain, rtol=1e-6)


def test_hinge_dpo_both_sides_of_the_margin():
    got, _, _ = dpo("hinge", beta=0.5)
    # relu(1 - 0.5*1.5) = 0.25 ; relu(1 + 0.75) = 1.75
    np.testing.assert_allclose(got, [0.25, 1.75], rtol=1e-6)
    got, _, _ = dpo("hinge", beta=1.0)
    # relu(1 - 1.5) = 0 ; relu(1 + 1.5) = 2.5
    np.testing.assert_allclose(got, [0.0, 2.5], rtol=1e-6)


def test_ipo_is_length_normalised():
    chosen_len = np.array([4, 2])
    rejected_len = np.array([5, 1])
    got, chosen_rewards, rejected_rewards = dpo(
        "ipo", chosen_lengths=chosen_len, rejected_lengths=rejected_len
    )
    # pair 0: 1/4 - (-0.5)/5 = 0.35 ; pair 1: -1/2 - 0.5/1 = -1.0 ; 1/(2*0.1) = 5
    want = [(0.35 - 5.0) ** 2, (-1.0 - 5.0) ** 2]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # implicit rewards stay un-normalised
    np.testing.assert_allclose(chosen_rewards, [0.1, -0.1], rtol=1e-6)
    np.testing.assert_allclose(rejected_rewards, [-0.05, 0.05], rtol=1e-6)


def test_implicit_rewards_are_beta_times_log_ratios_without_gradient():
    _, chosen_rewards, rejected_rewards = dpo("sigmoid", beta=0.5)
    np.testing.assert_allclose(chosen_rewards, [0.5, -0.5], rtol=1e-6)
    np.testing.assert_allclose(rejected_rewards, [-0.25, 0.25], rtol=1e-6)

    def reward_sum(pi_c):
        _, c, r = losses.dpo_loss(pi_c, PI_R, REF_C, REF_R, beta=0.5)
        return jnp.sum(c) + jnp.sum(r)

    np.testing.assert_array_equal(jax.grad(reward_sum)(jnp.asarray(PI_C)), [0.0, 0.0])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"loss_type": "cdpo"}, "valid names: sigmoid, robust, hinge, ipo"),
        ({"loss_type": "ipo"}, "pass chosen_lengths and rejected_lengths"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing applies only"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "[0, 0.5)"),
        ({"loss_type": "sigmoid", "label_smoothing": -0.1}, "[0, 0.5)"),
    ],
)
def test_dpo_rejects_bad_arguments(kwargs, fragment):
    with pytest.raises(losses.LossConfigError) as info:
        losses.dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, **kwargs)
    assert fragment in str(info.value)


def _grad_wrt_policy(loss_type, beta, **kwargs):
    def total(pi_c, pi_r):
        out, _, _ = losses.dpo_loss(
            pi_c, pi_r, REF_C, REF_R, beta=beta, loss_type=loss_type, **kwargs
        )
        return jnp.sum(out)

    return jax.grad(total, argnums=(0, 1))(jnp.asarray(PI_C), jnp.asarray(PI_R))


def test_sigmoid_dpo_gradient_closed_form():
    beta = 0.3
    d_chosen, d_rejected = _grad_wrt_policy("sigmoid", beta)
    # d/d delta of -log sigmoid(beta*delta) = -beta * sigmoid(-beta*delta)
    want = [-beta * sigmoid(-beta * d) for d in DELTAS]
    np.testing.assert_allclose(d_chosen, want, rtol=1e-5)
    np.testing.assert_allclose(d_rejected, [-w for w in want], rtol=1e-5)


def test_cdpo_gradient_closed_form():
    beta, eps = 0.3, 0.1
    d_chosen, _ = _grad_wrt_policy("sigmoid", beta, label_smoothing=eps)
    # d/d delta = beta * [-(1-eps) sigmoid(-b d) + eps sigmoid(b d)]
    want = [beta * (-(1 - eps) * sigmoid(-beta * d) + eps * sigmoid(beta * d)) for d in DELTAS]
    np.testing.assert_allclose(d_chosen, want, rtol=1e-5)


def test_hinge_gradient_closed_form():
    d_chosen, d_rejected = _grad_wrt_policy("hinge", 0.5)
    # beta*delta = 0.75 < 1 and -0.75 < 1: both active, slope -beta
    np.testing.assert_allclose(d_chosen, [-0.5, -0.5], rtol=1e-6)
    np.testing.assert_allclose(d_rejected, [0.5, 0.5], rtol=1e-6)
    d_chosen, _ = _grad_wrt_policy("hinge", 1.0)
    # pair 0: beta*delta = 1.5 > 1, flat
    np.testing.assert_allclose(d_chosen, [0.0, -1.0], rtol=1e-6)


def test_ipo_gradient_closed_form():
    chosen_len = np.array([4, 2])
    rejected_len = np.array([5, 1])
    d_chosen, d_rejected = _grad_wrt_policy(
        "ipo", BETA, chosen_lengths=chosen_len, rejected_lengths=rejected_len
    )
    # d/d pi_c of (delta_avg - 5)^2 = 2 (delta_avg - 5) / len_c ; pi_r: -2 (delta_avg - 5) / len_r
    residuals = [0.35 - 5.0, -1.0 - 5.0]
    np.testing.assert_allclose(
        d_chosen, [2 * r / n for r, n in zip(residuals, [4, 2], strict=True)], rtol=1e-5
    )
    np.testing.assert_allclose(
        d_rejected, [-2 * r / n for r, n in zip(residuals, [5, 1], strict=True)], rtol=1e-5
    )


def test_jit_with_traced_beta_matches_python_beta():
    @jax.jit
    def traced(beta, eps):
        out, c, r = losses.dpo_loss(
            PI_C, PI_R, REF_C, REF_R, beta=beta, loss_type="robust", label_smoothing=eps
        )
        k, _ = losses.kto_loss(PI_C, REF_C, np.array([True, False]), 0.2, beta=beta)
        return out, c, r, k

    for beta in (0.1, 0.025):
        jitted = traced(jnp.float32(beta), jnp.float32(0.2))
        eager = (
            *dpo("robust", beta=beta, label_smoothing=0.2),
            losses.kto_loss(PI_C, REF_C, np.array([True, False]), 0.2, beta=beta)[0],
        )
        for a, b in zip(jitted, eager, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)

    @jax.jit
    def ipo(beta):
        return dpo("ipo", beta=beta, chosen_lengths=np.array([4, 2]), rejected_lengths=[5, 1])[0]

    np.testing.assert_allclose(ipo(jnp.float32(0.1)), [(0.35 - 5) ** 2, 36.0], rtol=1e-6)


# ---------------------------------------------------------------- KTO


def test_kto_kl_estimate_mean_and_clamp():
    # mean((-3 - -4), (-5 - -4.5), (-1 - -1.2)) = (1 - 0.5 + 0.2) / 3
    kl = losses.kto_kl_estimate(np.array([-3.0, -5.0, -1.0]), np.array([-4.0, -4.5, -1.2]))
    assert float(kl) == pytest.approx(0.7 / 3, rel=1e-6)
    # negative mean clamps to 0
    kl = losses.kto_kl_estimate(np.array([-5.0, -6.0]), np.array([-4.0, -4.0]))
    assert float(kl) == 0.0


def test_kto_kl_estimate_has_no_gradient():
    ref = jnp.array([-4.0, -4.5, -1.2])
    grad = jax.grad(lambda p: losses.kto_kl_estimate(p, ref))(jnp.array([-3.0, -5.0, -1.0]))
    np.testing.assert_array_equal(grad, [0.0, 0.0, 0.0])


def test_kto_kl_estimate_averages_over_devices():
    devices = jax.devices()
    assert len(devices) == 8
    mesh = jax.make_mesh((8,), ("data",))
    rng = np.random.default_rng(0)
    policy = rng.normal(-3.0, 1.0, size=32).astype(np.float32)
    reference = policy - rng.normal(0.4, 0.3, size=32).astype(np.float32)
    want = max(float(np.mean(policy.astype(np.float64) - reference)), 0.0)

    sharding = NamedSharding(mesh, P("data"))
    p_global = jax.device_put(policy, sharding)
    r_global = jax.device_put(reference, sharding)

    per_shard = jax.shard_map(
        lambda p, r: losses.kto_kl_estimate(p, r, axis_name="data"),
        mesh=mesh,
        in_specs=(P("data"), P("data")),
        out_specs=P(),
    )
    assert float(jax.jit(per_shard)(p_global, r_global)) == pytest.approx(want, rel=1e-5)
    # without axis_name a shard only sees its own rows: the first shard's mean differs
    local_only = np.mean(policy[:4] - reference[:4])
    assert abs(local_only - want) > 1e-3

    # under plain jit with a globally sharded batch the mean is already global
    got = jax.jit(losses.kto_kl_estimate)(p_global, r_global)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_kto_loss_matches_paper_formula():
    policy = np.array([-10.0, -10.0, -7.0])
    reference = np.array([-12.0, -9.0, -8.0])  # log-ratios 2, -1, 1
    labels = np.array([True, False, False])
    beta, kl = 0.5, 0.4  # nu = 0.2
    got, rewards = losses.kto_loss(
        policy,
        reference,
        labels,
        kl,
        beta=beta,
        desirable_weight=1.0,
        undesirable_weight=3.0,
    )
    want = [
        1.0 * (1 - sigmoid(1.0 - 0.2)),  # desirable, r = 1.0
        3.0 * (1 - sigmoid(0.2 - (-0.5))),  # undesirable, r = -0.5
        3.0 * (1 - sigmoid(0.2 - 0.5)),  # undesirable, r = 0.5
    ]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(rewards, [1.0, -0.5, 0.5], rtol=1e-6)


def test_kto_loss_gradient_closed_form_and_kl_held_constant():
    reference = jnp.array([-12.0, -9.0])
    labels = jnp.array([True, False])
    beta, kl = 0.5, 0.4

    def total(policy, kl):
        return jnp.sum(losses.kto_loss(policy, reference, labels, kl, beta=beta)[0])

    d_policy, d_kl = jax.grad(total, argnums=(0, 1))(jnp.array([-10.0, -10.0]), kl)
    # desirable: d/dx (1 - s(b x - nu)) = -b s (1 - s); undesirable: +b s (1 - s) of s(nu - b x)
    s0 = sigmoid(beta * 2.0 - beta * kl)
    s1 = sigmoid(beta * kl - beta * -1.0)
    np.testing.assert_allclose(d_policy, [-beta * s0 * (1 - s0), beta * s1 * (1 - s1)], rtol=1e-5)
    assert float(d_kl) == 0.0


def test_kto_safety_undesirable_weight():
    assert losses.kto_safety_undesirable_weight(300, 100) == 3.0
    assert losses.kto_safety_undesirable_weight(50, 200) == 0.25
    with pytest.raises(losses.LossConfigError, match="0 undesirable"):
        losses.kto_safety_undesirable_weight(10, 0)


# ---------------------------------------------------------------- SFT, reward and cost models


def test_sft_loss_is_per_token_mean():
    # rows: 3 tokens with total log-prob -6, 1 token with -0.5 -> 6.5 / 4
    got = losses.sft_loss(np.array([-6.0, -0.5]), np.array([3, 1]))
    assert float(got) == pytest.approx(6.5 / 4, rel=1e-6)
    grad = jax.grad(losses.sft_loss)(jnp.array([-6.0, -0.5]), jnp.array([3, 1]))
    np.testing.assert_allclose(grad, [-0.25, -0.25], rtol=1e-6)
    assert float(losses.sft_loss(np.zeros(2), np.zeros(2, np.int32))) == 0.0


def test_bradley_terry_values_and_gradient():
    better = jnp.array([2.0, -1.0, 0.0])
    worse = jnp.array([0.5, 1.0, 0.0])
    got = losses.bradley_terry_loss(better, worse)
    np.testing.assert_allclose(got, [softplus(-1.5), softplus(2.0), math.log(2.0)], rtol=1e-6)
    d_better, d_worse = jax.grad(
        lambda b, w: jnp.sum(losses.bradley_terry_loss(b, w)), argnums=(0, 1)
    )(better, worse)
    # d/d r_better of -log sigmoid(m) = -sigmoid(-m), m = better - worse
    want = [-sigmoid(-m) for m in (1.5, -2.0, 0.0)]
    np.testing.assert_allclose(d_better, want, rtol=1e-5)
    np.testing.assert_allclose(d_worse, [-w for w in want], rtol=1e-5)


def test_cost_loss_sign_terms():
    safer = np.array([-1.0, -1.0, 0.5, 0.3])
    unsafer = np.array([2.0, 2.0, 1.0, -0.2])
    safer_signs = np.array([-1, -1, 1, 0])
    unsafer_signs = np.array([1, -1, 1, 0])
    got = losses.cost_loss(safer, unsafer, safer_signs, unsafer_signs)
    want = [
        # pair term -log s(2 - -1) ; safe & safer: -log s(1) ; unsafe & unsafer: -log s(2)
        softplus(-3.0) + softplus(-1.0) + softplus(-2.0),
        # both safe: unsafer gets -log s(-2)
        softplus(-3.0) + softplus(-1.0) + softplus(2.0),
        # both unsafe: -log s(0.5), -log s(1)
        softplus(-0.5) + softplus(-0.5) + softplus(-1.0),
        # unknown safety: only the pair term -log s(-0.2 - 0.3)
        softplus(0.5),
    ]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_cost_loss_gradient_of_sign_terms():
    def total(safer):
        return jnp.sum(
            losses.cost_loss(safer, jnp.array([2.0, 0.0]), jnp.array([-1, 0]), jnp.zeros(2))
        )

    grad = jax.grad(total)(jnp.array([-1.0, 0.5]))
    # d/dx of -log sigmoid(x) is -sigmoid(-x).
    # pair 0: d/dc_s [-log s(2 - c_s) - log s(-c_s)] = sigmoid(-3) + sigmoid(c_s), c_s = -1
    # pair 1: unknown sign, only the pair term: d/dc_s -log s(0 - c_s) = sigmoid(0.5)
    np.testing.assert_allclose(grad, [sigmoid(-3.0) + sigmoid(-1.0), sigmoid(0.5)], rtol=1e-5)


# ---------------------------------------------------------------- metrics


def test_preference_metrics_use_trl_names():
    metrics = losses.preference_metrics(
        np.array([0.3, -0.1, 0.2]),
        np.array([0.1, 0.2, 0.2]),
        np.array([-10.0, -20.0, -30.0]),
        np.array([-11.0, -21.0, -32.0]),
    )
    assert set(metrics) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    }
    assert float(metrics["rewards/chosen"]) == pytest.approx(0.4 / 3, rel=1e-6)
    assert float(metrics["rewards/rejected"]) == pytest.approx(0.5 / 3, rel=1e-6)
    # only pair 0 has chosen > rejected (a tie is not a win)
    assert float(metrics["rewards/accuracies"]) == pytest.approx(1 / 3, rel=1e-6)
    assert float(metrics["rewards/margins"]) == pytest.approx((0.2 - 0.3 + 0.0) / 3, abs=1e-7)
    assert float(metrics["logps/chosen"]) == pytest.approx(-20.0, rel=1e-6)
    assert float(metrics["logps/rejected"]) == pytest.approx(-64.0 / 3, rel=1e-6)


def test_score_model_accuracies():
    acc = losses.pair_accuracy(np.array([1.0, 0.0, 2.0, 3.0]), np.array([0.0, 1.0, 2.0, -1.0]))
    assert float(acc) == pytest.approx(0.5)
    # costs: 0.5 unsafe right; -0.2 safe right; 0.0 safe right (cost <= 0); -1 unsafe wrong;
    # 0.7 unknown, ignored -> 3 of 4
    costs = np.array([0.5, -0.2, 0.0, -1.0, 0.7])
    signs = np.array([1, -1, -1, 1, 0])
    assert float(losses.cost_sign_accuracy(costs, signs)) == pytest.approx(0.75)
    assert math.isnan(float(losses.cost_sign_accuracy(costs, np.zeros(5, np.int32))))


# ---------------------------------------------------------------- reference-free and SafeDPO

# Pair 0: chosen -6 over 3 tokens (avg -2), rejected -8 over 2 (avg -4).
# Pair 1: chosen -9 over 3 (avg -3), rejected -4 over 4 (avg -1).
FREE = losses.PairLogps(
    *(jnp.asarray(x) for x in ([-6.0, -9.0], [-8.0, -4.0], [0, 0], [0, 0], [3, 3], [2, 4]))
)


def test_simpo_is_the_papers_length_normalised_margin_loss():
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta/|y_w| log pi(y_w) -
    beta/|y_l| log pi(y_l) - gamma)."""
    coeffs = types.SimpleNamespace(beta=2.0, simpo_gamma=0.5, label_smoothing=0.0)
    got = losses.SIMPO.loss(FREE, coeffs)
    # pair 0: 2 * (-2 + 4) - 0.5 = 3.5 ; pair 1: 2 * (-3 + 1) - 0.5 = -4.5
    np.testing.assert_allclose(got, [softplus(-3.5), softplus(4.5)], rtol=1e-6)
    assert not losses.SIMPO.needs_reference


def test_orpo_is_the_papers_odds_ratio_loss_plus_nll():
    """ORPO (Hong et al. 2024, eqs. 4-7) with P = exp(mean token log-prob):
    odds = P / (1 - P); L = L_SFT + lambda * -log sigmoid(log(odds_w / odds_l))."""
    lam = 0.1
    got = losses.ORPO.loss(FREE, types.SimpleNamespace(beta=lam)) + losses.chosen_nll(FREE)
    nll = (6.0 + 9.0) / 6.0  # chosen tokens over the batch: 15 nats over 6 tokens
    want = []
    for avg_w, avg_l in ((-2.0, -4.0), (-3.0, -1.0)):
        p_w, p_l = math.exp(avg_w), math.exp(avg_l)
        log_odds_ratio = math.log((p_w / (1 - p_w)) / (p_l / (1 - p_l)))
        want.append(nll + lam * softplus(-log_odds_ratio))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not losses.ORPO.needs_reference


def test_safedpo_margin_applies_only_against_unsafe_rejected_answers():
    """-log sigmoid(beta d - (h_r - h_c) Delta): pair 0 both safe, pair 1 rejected unsafe."""
    pairs = losses.PairLogps(*(jnp.asarray(x) for x in (PI_C, PI_R, REF_C, REF_R, [1, 1], [1, 1])))
    coeffs = types.SimpleNamespace(beta=BETA, safety_margin=2.0)
    got = losses.safedpo_loss(pairs, coeffs, [0, 0], [0, 1])
    # beta d = 0.15 and -0.15; pair 1 must clear the margin 2 as well
    np.testing.assert_allclose(got, [softplus(-0.15), softplus(0.15 + 2.0)], rtol=1e-6)


def test_per_pair_label_smoothing_from_the_data():
    """A batch column ``label_smoothing`` replaces the stage's eps pair by pair (cDPO with
    soft labels), checked against the formula on the model's own log-probs."""
    from sacpo_jax import parallel
    from sacpo_jax.logprobs import pair_logps
    from sacpo_jax.models.init import init_model
    from sacpo_jax.models.llama import tiny_config
    from sacpo_jax.training import objectives

    model = init_model(tiny_config(), parallel.make_mesh(devices=jax.devices()[:1]), seed=0)
    rng = np.random.default_rng(0)
    batch = {}
    for side in ("chosen", "rejected"):
        batch[f"{side}_input_ids"] = jnp.asarray(rng.integers(3, 256, (4, 12)), jnp.int32)
        batch[f"{side}_attention_mask"] = jnp.ones((4, 12), jnp.int32)
        batch[f"{side}_loss_mask"] = jnp.asarray(np.arange(12) >= 6, jnp.int32)[None].repeat(4, 0)
    batch["reference_chosen_logps"] = jnp.asarray([-20.0, -25.0, -30.0, -22.0])
    batch["reference_rejected_logps"] = jnp.asarray([-24.0, -21.0, -30.0, -26.0])
    eps = np.array([0.0, 0.1, 0.5, 0.3])
    batch["label_smoothing"] = jnp.asarray(eps, jnp.float32)
    coefficients = objectives.DpoCoefficients(1e-3, 0.5)
    _, _, rows = objectives.dpo("sigmoid", coefficients).loss(model, batch, coefficients)
    policy = pair_logps(model, batch)
    delta = np.asarray(policy["chosen_logps"] - batch["reference_chosen_logps"]) - np.asarray(
        policy["rejected_logps"] - batch["reference_rejected_logps"]
    )
    z = 0.5 * delta
    expected = (1 - eps) * np.logaddexp(0.0, -z) + eps * np.logaddexp(0.0, z)  # -log sigmoid
    np.testing.assert_allclose(np.asarray(rows["loss"]), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"loss_type": "hinge"}, "loss_type 'hinge' ignores it"),
        ({"label_smoothing": 0.1}, "label_smoothing 0.1 would be ignored"),
        ({"loss_type": "robust"}, "needs every eps < 0.5"),
    ],
)
def test_per_pair_label_smoothing_needs_a_smoothing_loss(stage, message):
    from sacpo_jax.config import ConfigError, DpoStage
    from sacpo_jax.data.dataset import Ragged, TokenizedDataset
    from sacpo_jax.training import objectives

    data = {"source": {"type": "jsonl", "path": "x.jsonl"}, "adapter": "pair"}
    dpo_stage = DpoStage.model_validate({"name": "d", "kind": "dpo", "data": data, **stage})
    tokens = Ragged.from_rows([[1], [2]])
    dataset = TokenizedDataset(
        "pair", tokens, (tokens, tokens), {"label_smoothing": np.array([0.2, 0.5])}
    )
    with pytest.raises(ConfigError, match=message):
        objectives.for_stage(dpo_stage, dataset)
