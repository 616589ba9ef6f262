"""PPO's tensor maths against plain-Python references."""

import math

import torch

from alignkit.stages import ppo_core as core


def test_gae_matches_a_direct_loop():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float)
    gamma, lam = 0.9, 0.8
    adv, ret = core.gae(rewards * mask, values, mask, gamma, lam)
    for b in range(3):
        n = int(mask[b].sum())
        expected, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            nxt = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * nxt - values[b, t].item()
            running = delta + gamma * lam * running
            expected[t] = running
        assert torch.allclose(adv[b, :n], torch.tensor(expected), atol=1e-5)
        assert adv[b, n:].abs().sum() == 0
        assert torch.allclose(ret[b, :n], adv[b, :n] + values[b, :n], atol=1e-6)


def test_token_rewards_put_the_score_on_the_last_token():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.float)
    kl = torch.ones(2, 3)
    r = core.token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.1)
    assert torch.allclose(r, torch.tensor([[-0.1, -0.1, 1.9], [-1.1, 0.0, 0.0]]))


def test_policy_loss_clips_and_reports():
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, 1.0]])
    same = core.policy_loss(old.clone(), old, adv, mask, clip=0.2)
    assert math.isclose(same.loss.item(), -1.0) and same.clip_fraction.item() == 0
    far = core.policy_loss(torch.full((1, 2), math.log(2.0)), old, adv, mask, clip=0.2)
    assert math.isclose(far.loss.item(), -1.2, rel_tol=1e-6) and far.clip_fraction.item() == 1


def test_kl_estimators_and_whitening():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert torch.allclose(core.kl_estimate(logp, ref, "k1"), logp - ref)
    k3 = core.kl_estimate(logp, ref, "k3")
    assert (k3 >= 0).all() and torch.allclose(k3, torch.exp(ref - logp) - 1 - (ref - logp))
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = core.masked_whiten(x, mask)
    assert abs(core.masked_mean(w, mask).item()) < 1e-6 and w[0, 3] == 0


def test_adaptive_kl_moves_towards_target_faster_from_above():
    ctl = core.AdaptiveKLController(0.1, target=1.0, horizon=100, overshoot_gain=4.0)
    ctl.update(3.0, n_samples=10)  # above: +20% error x 4 x 10/100
    assert math.isclose(ctl.value, 0.1 * 1.08)
    ctl.update(0.0, n_samples=10)  # below: -20% error x 10/100
    assert math.isclose(ctl.value, 0.1 * 1.08 * 0.98)
    symmetric = core.AdaptiveKLController(0.1, target=1.0, horizon=100, overshoot_gain=1.0)
    symmetric.update(3.0, n_samples=10)
    assert math.isclose(symmetric.value, 0.1 * 1.02)


def test_constant_reward_gives_zero_mean_whitened_advantages():
    torch.manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float)
    rewards = core.token_rewards(torch.full((3,), 0.7), torch.zeros(3, 4), mask, kl_coef=0.0)
    adv, _ = core.gae(rewards, torch.randn(3, 4), mask, gamma=1.0, lam=0.95)
    white = core.masked_whiten(adv, mask)
    assert abs(core.masked_mean(white, mask).item()) < 1e-6
    assert abs(core.masked_var(white, mask).item() - 1) < 1e-4


def test_without_kl_one_epoch_loss_is_the_plain_clipped_objective():
    torch.manual_seed(2)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float)
    scores = torch.tensor([1.0, -0.5])
    old = torch.randn(2, 3)
    new = old + 0.3 * torch.randn(2, 3)
    rewards = core.token_rewards(scores, core.kl_estimate(old, old + 5), mask, kl_coef=0.0)
    adv, _ = core.gae(rewards, torch.zeros(2, 3), mask, gamma=1.0, lam=1.0)
    # gamma = lambda = 1 and zero values: every token's advantage is the sequence score
    assert torch.allclose(adv, scores[:, None] * mask)
    got = core.policy_loss(new, old, adv, mask, clip=0.2).loss
    terms = []
    for b in range(2):
        for t in range(int(mask[b].sum())):
            r = math.exp(new[b, t] - old[b, t])
            a = adv[b, t].item()
            terms.append(-min(r * a, max(min(r, 1.2), 0.8) * a))
    assert math.isclose(got.item(), sum(terms) / len(terms), rel_tol=1e-5)


def test_token_logprobs_and_chunked_entropy_match_the_full_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50, requires_grad=True)
    tokens = torch.randint(0, 50, (3, 5))
    full = torch.log_softmax(logits, -1)
    want = full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    got = core.token_logprobs(logits, tokens)
    assert torch.allclose(got, want, atol=1e-6)
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    (g_want,) = torch.autograd.grad(want.sum(), logits)
    assert torch.allclose(g_got, g_want, atol=1e-6)
    entropy = -(full.exp() * full).sum(-1)
    assert torch.allclose(core.entropy_from_logits(logits), entropy, atol=1e-6)  # with grad
    with torch.no_grad():  # one sequence at a time
        assert torch.allclose(core.entropy_from_logits(logits), entropy, atol=1e-6)
