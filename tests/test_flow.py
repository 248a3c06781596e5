"""Flow math: schedules, Euler rollout, query sampler, losses, CFG (property tests where they fit)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from danceopd.flow import (cfg_combine, clean_estimate, dense_velocity_loss, forward_noise, gather_states, rollout_states,
                           rollout_to_queries, sample_query_indices, sd3_sigmas, sigma_schedule, velocity_mse, velocity_target)
from danceopd.flow.query import BETA_LAWS
from danceopd.flow.solver import MIN_ROWS
from danceopd.suite.teachers import gaussian_mixture_velocity


@pytest.mark.parametrize("steps", [1, 4, 16, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sd3_schedule_matches_diffusers_scheduler(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    assert torch.equal(sd3_sigmas(steps, shift), sched.sigmas)


@given(steps=st.integers(1, 40), kind=st.sampled_from(["uniform", "sd3"]), shift=st.floats(1.0, 6.0))
def test_schedules_decrease_from_one_to_zero(steps, kind, shift):
    s = sigma_schedule(steps, kind, shift)
    assert s.shape == (steps + 1,)
    assert s[0] == pytest.approx(1.0) and s[-1] == 0.0
    assert bool((s[1:] < s[:-1]).all())


def test_path_identities():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    sigma = torch.rand(5, generator=g)
    x = forward_noise(x0, eps, sigma)
    v = velocity_target(x0, eps)
    torch.testing.assert_close(clean_estimate(x, sigma, v), x0)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 24), kind=st.sampled_from(["uniform", "sd3"]),
       shift=st.floats(1.0, 5.0))
def test_euler_over_point_mass_field_lands_on_target(seed, steps, kind, shift):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(3, 2, 5, 5, generator=g) * 2 - 1
    noise = torch.randn(3, 2, 5, 5, generator=g)
    flat = target.reshape(3, 1, -1)
    traj = rollout_states(lambda x, s: gaussian_mixture_velocity(x.reshape(3, -1), s, flat).view_as(x), noise,
                          sigma_schedule(steps, kind, shift))
    assert traj.states.shape == (steps, 3, 2, 5, 5)
    torch.testing.assert_close(traj.states[0], noise)
    torch.testing.assert_close(traj.final, target, atol=1e-5, rtol=0)


def test_rollout_runs_without_grad_and_visits_every_state():
    w = torch.nn.Parameter(torch.ones(1))
    sig = sigma_schedule(5)
    seen = []

    def vel(x, s):
        seen.append(float(s[0]))
        return w * x

    traj = rollout_states(vel, torch.ones(2, 1, 1, 1), sig)
    assert not traj.final.requires_grad
    assert seen == pytest.approx(sig[:-1].tolist())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 12), b=st.integers(1, 41), k=st.integers(1, 3),
       position=st.sampled_from(["low", "mid", "high", "uniform", "stratified", "dense"]), skip=st.integers(0, 3),
       chunk=st.sampled_from([None, 16, 20]))
def test_truncated_rollout_stops_each_sample_at_its_deepest_query(seed, n, b, k, position, skip, chunk):
    """The queried states equal those of the full rollout; each sample gets exactly as many Euler steps as its
    deepest queried index (padded to multiples of 4 rows when the batch is one); skipped samples get none."""
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(b, 2, 3, 3, generator=g), torch.randn(b, 2, 3, 3, generator=g)
    sigmas = sigma_schedule(n)
    idx = sample_query_indices(n, b, k, position, g)
    skipped = torch.arange(b) < min(skip, b)
    steps_of_row = torch.zeros(b, dtype=torch.long)

    def vel(x, s, rows):  # row-wise point-mass field: a row's velocity never depends on the others
        steps_of_row[rows] += 1
        return (x - x0[rows]) / s.view(-1, 1, 1, 1)

    got = rollout_to_queries(vel, noise, sigmas, idx, skip=skipped, chunk=chunk)
    full = rollout_states(lambda x, s: (x - x0) / s.view(-1, 1, 1, 1), noise, sigmas)
    want_x, want_sigma = gather_states(full.states, full.sigmas, idx)
    kk = idx.shape[1]
    keep = (~skipped).repeat_interleave(kk)
    assert torch.equal(got.x[keep], want_x[keep]) and torch.equal(got.sigma, want_sigma)
    assert bool(got.x[~keep].isnan().all())
    deepest = torch.where(skipped, 0, idx.amax(1))
    if b % 4 or b < MIN_ROWS:  # not a multiple of the row quantum, or small: the whole batch runs until no sample needs another step
        assert steps_of_row.tolist() == [int(deepest.max())] * b and got.rows_evaluated == b * int(deepest.max())
    else:  # each step: the rows still going, in multiples of 4 and at least MIN_ROWS
        assert bool((steps_of_row >= deepest).all()) and got.rows_evaluated == int(steps_of_row.sum())
        going = [int((deepest > i).sum()) for i in range(n)]
        assert got.rows_evaluated == sum(min(b, max(MIN_ROWS, -(-a // 4) * 4)) for a in going if a)
    assert got.rows_evaluated <= b * (n - 1) if n > 1 else got.rows_evaluated == 0  # the final step never runs
    for bad in (6, 12):
        with pytest.raises(ValueError, match="multiple of 4 rows and at least 16"):
            rollout_to_queries(vel, noise, sigmas, idx, chunk=bad)


def _index_probs(law: str, n: int) -> np.ndarray:
    if law == "uniform":
        return np.full(n, 1.0 / n)
    a, b = BETA_LAWS[law]
    edges = stats.beta(a, b).cdf(np.arange(n + 1) / n)
    return np.diff(edges)


@pytest.mark.parametrize("law", ["low", "mid", "high", "uniform"])
@pytest.mark.parametrize("n", [8, 16])
def test_query_index_distribution_matches_its_law(law, n):
    idx = sample_query_indices(n, 20000, 1, law, torch.Generator().manual_seed(1)).flatten().numpy()
    counts = np.bincount(idx, minlength=n)
    expected = _index_probs(law, n) * len(idx)
    keep = expected > 5
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    p = stats.chi2.sf(chi2, keep.sum() - 1)
    assert p > 1e-3, f"{law}: chi2 p-value {p:.2e}, counts {counts.tolist()}"


def test_low_noise_law_prefers_late_states():
    idx = sample_query_indices(16, 5000, 1, "low", torch.Generator().manual_seed(0)).float()
    assert idx.mean() > 16 * 0.66  # Beta(5,2) mean 5/7 of the way to the low-noise end


@given(k=st.integers(1, 8), n=st.integers(1, 20), seed=st.integers(0, 1000))
def test_stratified_draws_one_index_per_stratum(k, n, seed):
    idx = sample_query_indices(n, 50, k, "stratified", torch.Generator().manual_seed(seed))
    assert idx.shape == (50, k)
    for j in range(k):
        lo, hi = np.floor(j / k * n), np.floor((j + 1) / k * n)
        col = idx[:, j]
        assert bool(((col >= lo) & (col <= min(hi, n - 1))).all())


def test_dense_and_any_k():
    assert sample_query_indices(6, 3, 1, "dense").tolist() == [list(range(6))] * 3
    idx = sample_query_indices(8, 4, 5, "mid", torch.Generator().manual_seed(0))
    assert idx.shape == (4, 5) and bool(((idx >= 0) & (idx < 8)).all())
    with pytest.raises(ValueError, match="query position"):
        sample_query_indices(8, 4, 1, "middle")


def test_sampler_is_reproducible_from_its_generator():
    a = sample_query_indices(16, 64, 2, "low", torch.Generator().manual_seed(7))
    b = sample_query_indices(16, 64, 2, "low", torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_gather_states_is_sample_major():
    states = torch.arange(4 * 3).float().view(4, 3, 1, 1, 1)  # state i of sample b = 3 i + b
    idx = torch.tensor([[0, 3], [1, 1], [2, 0]])
    x, s = gather_states(states, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), idx)
    assert x.flatten().tolist() == [0, 9, 4, 4, 8, 2]
    assert s.tolist() == [1.0, 0.25, 0.75, 0.75, 0.5, 1.0]


def test_losses():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(6, 3, 2, 2, generator=g), torch.randn(6, 3, 2, 2, generator=g)
    assert velocity_mse(pred, target).item() == pytest.approx(((pred - target) ** 2).mean().item())
    dt = torch.tensor([0.5, 0.25, 0.25] * 2)
    per = ((pred - target) ** 2).flatten(1).mean(1)
    manual = ((dt**2 / 2 * per).view(2, 3).sum(1)).mean()
    assert dense_velocity_loss(pred, target, dt, k=3).item() == pytest.approx(manual.item())


def test_cfg_combine():
    u, c = torch.randn(4), torch.randn(4)
    torch.testing.assert_close(cfg_combine(u, c, 1.0), c)
    torch.testing.assert_close(cfg_combine(u, c, 0.0), u)
    torch.testing.assert_close(cfg_combine(u, c, 3.5), u + 3.5 * (c - u))


@pytest.mark.parametrize("tau", [0.0, 0.1, 0.3])
def test_mixture_velocity_equals_score_identity(tau):
    """Independent check of the closed form: v = -(x + s * grad log p_s(x)) / (1 - s) for the linear path."""
    g = torch.Generator().manual_seed(0)
    refs = torch.randn(5, 6, generator=g, dtype=torch.float64)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    s = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    a = (1 - s).view(-1, 1, 1)
    var = a**2 * tau**2 + s.view(-1, 1, 1) ** 2
    logp = torch.logsumexp(-((x[:, None] - a * refs[None]) ** 2).sum(-1, keepdim=True) / (2 * var), dim=1).sum()
    (grad,) = torch.autograd.grad(logp, x)
    expected = -(x + s.view(-1, 1) * grad) / (1 - s).view(-1, 1)
    got = gaussian_mixture_velocity(x.detach(), s, refs, tau)
    torch.testing.assert_close(got, expected.detach())


def _toolkit_k_indices(n: int, k: int, a: float, b: float, rng) -> list[int]:
    """The official toolkit's rule (worldbench/DanceOPD 4440ab5, core/timestep.py), restated: Beta draws, index
    floor(u N), repeated until K are distinct (at most 50 K draws, then uniform indices), sorted."""
    chosen: set[int] = set()
    attempts = 0
    while len(chosen) < k and attempts < 50 * k:
        chosen.add(min(max(int(rng.beta(a, b) * n), 0), n - 1))
        attempts += 1
    while len(chosen) < k:
        chosen.add(int(rng.integers(n)))
    return sorted(chosen)


def test_distinct_k_sampling_reproduces_the_toolkits_index_distribution():
    """K = 4 of N = 8 (low: Beta(5, 2)): no repeats, sorted, and each index's share within sampling noise of the
    toolkit's algorithm (these shares are not the Beta bins: rejection pushes mass to the rarer indices). The i.i.d.
    rule repeats an index in most rows; at K = 1 the two rules draw the same index."""
    n, k, rows = 8, 4, 40000
    ours = sample_query_indices(n, rows, k, "low", torch.Generator().manual_seed(0), sampling="distinct")
    assert all(len(set(r)) == k and r == sorted(r) for r in ours.tolist())
    rng = np.random.default_rng(0)
    theirs = np.array([_toolkit_k_indices(n, k, *BETA_LAWS["low"], rng) for _ in range(rows)])
    ours_share = np.bincount(ours.flatten().numpy(), minlength=n) / ours.numel()
    their_share = np.bincount(theirs.flatten(), minlength=n) / theirs.size
    assert np.abs(ours_share - their_share).max() < 0.006, (ours_share, their_share)  # std of a share here ~0.0012
    bins = np.diff(stats.beta(*BETA_LAWS["low"]).cdf(np.linspace(0, 1, n + 1)))
    assert np.abs(their_share - bins).max() > 0.05  # not the Beta bins
    iid = sample_query_indices(n, rows, k, "low", torch.Generator().manual_seed(0), sampling="iid")
    assert np.mean([len(set(r)) < k for r in iid.tolist()]) > 0.4  # most i.i.d. rows repeat an index
    for law in ("low", "uniform"):
        a = sample_query_indices(n, 64, 1, law, torch.Generator().manual_seed(3), sampling="distinct")
        assert torch.equal(a, sample_query_indices(n, 64, 1, law, torch.Generator().manual_seed(3), sampling="iid"))
    uniform = sample_query_indices(n, 2000, 3, "uniform", torch.Generator().manual_seed(1), sampling="distinct")
    assert all(len(set(r)) == 3 for r in uniform.tolist())
    assert np.abs(np.bincount(uniform.flatten().numpy(), minlength=n) / uniform.numel() - 1 / n).max() < 0.015
    assert sample_query_indices(n, 2, 9, "low", sampling="distinct").tolist() == [list(range(n))] * 2  # K >= N: all


def test_dense_weights_uniform_are_the_toolkits_and_dt2_follows_the_grid():
    """On the SD3 shift-3 grid of 16 steps: uniform weighs every state 0.5 / 16^2 (the toolkit's constant), dt2 weighs
    state i by dt_i^2 / 2; on a uniform grid the two are the same loss."""
    n, b = 16, 3
    sigmas = sd3_sigmas(n, 3.0)
    dt = (sigmas[:-1] - sigmas[1:]).repeat(b)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(b * n, 4, 2, 2, generator=g), torch.randn(b * n, 4, 2, 2, generator=g)
    per_state = ((pred - target) ** 2).flatten(1).mean(1).view(b, n)
    uniform = dense_velocity_loss(pred, target, dt, n, weight="uniform")
    assert uniform.item() == pytest.approx((per_state * (0.5 / 16 ** 2)).sum(1).mean().item(), rel=1e-6)
    dt2 = dense_velocity_loss(pred, target, dt, n, weight="dt2")
    assert dt2.item() == pytest.approx((per_state * (sigmas[:-1] - sigmas[1:]) ** 2 / 2).sum(1).mean().item(), rel=1e-6)
    ratio = ((sigmas[:-1] - sigmas[1:]) * n) ** 2  # each dt2 weight over the uniform one
    # from 0.020x (the last step, sigma 0.0089 -> 0) to 7.75x; the first step's is 0.138x
    assert ratio.min().item() == pytest.approx(0.0204, abs=0.0005) and int(ratio.argmin()) == n - 1
    assert ratio[0].item() == pytest.approx(0.138, abs=0.002) and ratio.max().item() == pytest.approx(7.75, abs=0.05)
    flat = torch.full((b * n,), 1.0 / n)
    assert dense_velocity_loss(pred, target, flat, n, weight="dt2").item() == pytest.approx(
        dense_velocity_loss(pred, target, flat, n, weight="uniform").item(), rel=1e-6)
