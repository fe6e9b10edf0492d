"""Probability-flow-ODE likelihood on a correlated Gaussian toy with the exact model (closed forms), the
divergence estimators against autograd, bits per dimension and the latent normalization's change of variables."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from gmpipe.diffusion import (
    Objective,
    bits_per_dim,
    get_schedule,
    get_target,
    make_guided_model_fn,
    normalization_log_det,
    ode_log_likelihood,
)
from gmpipe.diffusion.likelihood import draw_probes, prior_log_prob, velocity_and_divergence
from gmpipe.seeds import SampleNoise

PAIRS = [("rectified_flow", "velocity"), ("vp_linear", "epsilon"), ("vp_cosine", "v_prediction")]


class CorrelatedGaussianToy:
    """Data x ~ N(mu, Sigma) in 3-D with a full covariance (so the ODE's Jacobian is not diagonal and the
    Hutchinson estimator has variance), and the exact model: with V_t = a^2 Sigma + b^2 I,
    E[x | x_t] = mu + a Sigma V_t^-1 (x_t - a mu) and E[z | x_t] = b V_t^-1 (x_t - a mu).

    The exact probability-flow ODE keeps p_t = N(a mu, V_t) and, in the eigenbasis U of Sigma (shared by every
    V_t), scales each coordinate of x_t - a mu by sqrt(V_t / V_s): that gives x_1 from x in closed form.
    """

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        factor = torch.randn(3, 3, generator=generator, dtype=torch.float64)
        self.mu = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
        self.cov = factor @ factor.T + 0.2 * torch.eye(3, dtype=torch.float64)  # eigenvalues 0.27, 1.8, 10.5
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(self.cov)
        self.data = MultivariateNormal(self.mu, self.cov)

    def model_fn(self, objective: Objective):
        def exact_prediction(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            a = objective.schedule.a(t)[:, None, None]  # (B, 1, 1)
            b = objective.schedule.b(t)[:, None, None]
            marginal_cov = a.square() * self.cov + b.square() * torch.eye(3, dtype=x_t.dtype)  # (B, 3, 3)
            whitened = torch.linalg.solve(marginal_cov, (x_t - a[:, :, 0] * self.mu)[..., None])  # (B, 3, 1)
            x_hat = self.mu + (a * self.cov @ whitened)[..., 0]
            z_hat = (b * whitened)[..., 0]
            return objective.from_data_and_noise(x_hat, z_hat, t)

        return exact_prediction

    def _marginal(self, objective: Objective, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(a(t), eigenvalues of V_t)."""
        t = torch.tensor(t, dtype=torch.float64)
        a, b = objective.schedule.a(t), objective.schedule.b(t)
        return a, a.square() * self.eigenvalues + b.square()

    def ode_answer(self, objective: Objective, x: torch.Tensor, t_min: float) -> torch.Tensor:
        """What an exact integration returns: log p_{t_min}(x) - log p_1(x_1) + log prior(x_1), with x_1 the
        exact flow of x from t_min to 1 (the prior N(0, b(1)^2 I) differs from p_1 where a(1) > 0)."""
        a_0, v_0 = self._marginal(objective, t_min)
        a_1, v_1 = self._marginal(objective, 1.0)
        basis = self.eigenvectors
        x_1 = a_1 * self.mu + ((x - a_0 * self.mu) @ basis * (v_1 / v_0).sqrt()) @ basis.T
        log_p_0 = MultivariateNormal(a_0 * self.mu, basis @ torch.diag(v_0) @ basis.T).log_prob(x)
        log_p_1 = MultivariateNormal(a_1 * self.mu, basis @ torch.diag(v_1) @ basis.T).log_prob(x_1)
        return log_p_0 - log_p_1 + prior_log_prob(objective, x_1)


@pytest.fixture(scope="module")
def toy() -> CorrelatedGaussianToy:
    return CorrelatedGaussianToy()


def _objective(schedule: str, target: str) -> Objective:
    return Objective(get_schedule(schedule), get_target(target))


def _data(toy: CorrelatedGaussianToy, n: int = 32) -> torch.Tensor:
    """(n, 3) draws from the toy's data distribution, seeded."""
    noise = torch.randn(n, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return toy.mu + noise @ torch.linalg.cholesky(toy.cov).T


@pytest.mark.parametrize("schedule, target", PAIRS)
def test_exact_trace_likelihood_matches_the_closed_form(toy, schedule, target):
    objective = _objective(schedule, target)
    x = _data(toy)
    result = ode_log_likelihood(toy.model_fn(objective), objective, x, num_steps=32, trace="exact")
    assert result.num_dims == 3 and result.nfe == 32 * 4 and torch.equal(result.standard_error, torch.zeros(32))
    # RK4 with 32 steps against the exact integration: measured <= 2e-5 nats (rectified flow 3e-7)
    torch.testing.assert_close(result.log_likelihood, toy.ode_answer(objective, x, 1e-5), atol=1e-4, rtol=0)
    # against the data's own log-density: t_min = 1e-5 costs ~1.4e-4 nats; the VP prior N(0, b(1)^2 I) ignores
    # the a(1) mu share of x_1 (a(1) = 0.0066 and 0.01), measured 0.014 and 0.022 nats
    tolerance = 1e-3 if schedule == "rectified_flow" else 0.04
    torch.testing.assert_close(result.log_likelihood, toy.data.log_prob(x), atol=tolerance, rtol=0)


def test_likelihood_with_a_wrong_model_is_lower(toy):
    # the exact model of a wider Gaussian is a different flow: its likelihood of the data is lower on average
    objective = _objective("rectified_flow", "velocity")
    x = _data(toy)
    wider = CorrelatedGaussianToy()
    wider.cov = 4 * toy.cov
    exact = ode_log_likelihood(toy.model_fn(objective), objective, x, num_steps=16, trace="exact")
    wrong = ode_log_likelihood(wider.model_fn(objective), objective, x, num_steps=16, trace="exact")
    torch.testing.assert_close(wrong.log_likelihood, MultivariateNormal(toy.mu, 4 * toy.cov).log_prob(x),
                               atol=1e-3, rtol=0)
    assert wrong.log_likelihood.mean() < exact.log_likelihood.mean() - 0.5


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
@pytest.mark.parametrize("schedule, target", PAIRS[:2])
def test_hutchinson_likelihood_is_unbiased_with_a_calibrated_standard_error(toy, schedule, target, probe):
    objective = _objective(schedule, target)
    x = _data(toy)
    result = ode_log_likelihood(toy.model_fn(objective), objective, x, num_steps=16, num_probes=32, probe=probe,
                                generator=torch.Generator().manual_seed(2))
    error = result.log_likelihood - toy.ode_answer(objective, x, 1e-5)
    # in 3-D a Rademacher probe takes 4 values (up to sign), so per-sample z-scores are far from normal; judge
    # the batch instead. Measured over 12 seeds (both probes): RMS error / RMS standard error in [0.78, 1.22],
    # the batch-sum z-score in [-2.2, 1.6]; standard error ~0.3 nats per sample with 32 probes.
    rms_standard_error = result.standard_error.square().mean().sqrt()
    assert 0.6 < error.square().mean().sqrt() / rms_standard_error < 1.5
    assert error.sum().abs() < 4 * result.standard_error.square().sum().sqrt()
    again = ode_log_likelihood(toy.model_fn(objective), objective, x, num_steps=16, num_probes=32, probe=probe,
                               generator=torch.Generator().manual_seed(2))
    assert torch.equal(result.log_likelihood, again.log_likelihood)


def _nonlinear_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A velocity with a dense, state-dependent Jacobian, samples independent: (B, 2, 2) -> (B, 2, 2)."""
    weight = torch.tensor([[0.5, -1.0, 0.3, 0.2], [0.7, 0.1, -0.4, 0.9], [0.0, 0.6, 1.1, -0.3],
                           [-0.8, 0.2, 0.5, 0.4]], dtype=x_t.dtype)
    flat = x_t.flatten(1)
    return (torch.tanh(flat @ weight) * (1 + t[:, None]) + flat.square() @ weight.T / 4).view_as(x_t)


def test_divergence_matches_the_autograd_jacobian_trace():
    objective = _objective("rectified_flow", "velocity")
    x = torch.randn(5, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.full((5,), 0.3, dtype=torch.float64)
    traces = torch.stack([
        torch.autograd.functional.jacobian(lambda row: _nonlinear_model(row[None], t[:1])[0], row).reshape(4, 4).trace()
        for row in x
    ])
    velocity, exact = velocity_and_divergence(_nonlinear_model, objective, x, t, None)
    torch.testing.assert_close(velocity, _nonlinear_model(x, t))
    torch.testing.assert_close(exact[0], traces)
    # Hutchinson over many probes: unbiased, its sample mean within 4 standard errors of the trace
    probes = draw_probes(2000, x, "gaussian", torch.Generator().manual_seed(4))
    _, estimates = velocity_and_divergence(_nonlinear_model, objective, x, t, probes)
    standard_error = estimates.std(0) / math.sqrt(len(probes))
    assert ((estimates.mean(0) - traces).abs() < 4 * standard_error).all()
    assert (standard_error > 0.01).all()  # the Jacobian is dense: the estimator does have variance


def test_rademacher_probes_are_exact_for_a_diagonal_jacobian(toy):
    # eps^T J eps = sum_i J_ii eps_i^2 = tr J when J is diagonal and eps_i = +-1: the Gaussian toy with a
    # diagonal covariance gives an elementwise velocity
    objective = _objective("vp_linear", "velocity")
    diagonal = CorrelatedGaussianToy()
    diagonal.cov = torch.diag(torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64))
    x = _data(toy, 8)
    exact = ode_log_likelihood(diagonal.model_fn(objective), objective, x, num_steps=8, trace="exact")
    one_probe = ode_log_likelihood(diagonal.model_fn(objective), objective, x, num_steps=8, num_probes=1,
                                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(one_probe.log_likelihood, exact.log_likelihood)
    assert one_probe.standard_error.isnan().all()  # one probe: no spread to measure


def test_per_sample_probes_do_not_depend_on_the_batch(toy):
    """With a SampleNoise generator each sample draws its probes from its own stream: its estimate is the same
    alone as inside a batch."""
    objective = _objective("rectified_flow", "velocity")
    x = _data(toy, 3)
    for probe in ("rademacher", "gaussian"):
        batch = draw_probes(4, x, probe, SampleNoise([10, 11, 12]))
        alone = draw_probes(4, x[2:], probe, SampleNoise([12]))
        assert batch.shape == (4, 3, 3) and torch.equal(batch[:, 2:], alone)
    together = ode_log_likelihood(toy.model_fn(objective), objective, x, num_steps=4, num_probes=3,
                                  generator=SampleNoise([10, 11, 12]))
    single = ode_log_likelihood(toy.model_fn(objective), objective, x[1:2], num_steps=4, num_probes=3,
                                generator=SampleNoise([11]))
    torch.testing.assert_close(together.log_likelihood[1:2], single.log_likelihood)


def test_bits_per_dim_and_nfe(toy):
    objective = _objective("rectified_flow", "velocity")
    x = _data(toy, 4)
    result = ode_log_likelihood(toy.model_fn(objective), objective, x, num_steps=6, trace="exact", integrator="heun")
    assert result.nfe == 12
    torch.testing.assert_close(result.bits_per_dim(), -result.log_likelihood / (3 * math.log(2)))
    torch.testing.assert_close(bits_per_dim(torch.tensor([-2 * math.log(2)]), 2), torch.tensor([1.0]))

    def denoiser(x_t, t, labels):
        return toy.model_fn(objective)(x_t, t)

    guided = make_guided_model_fn(denoiser, torch.zeros(4), torch.ones(4), 1.5)
    assert ode_log_likelihood(guided, objective, x, num_steps=3, trace="exact").nfe == 3 * 4 * 2


def test_prior_is_the_noise_end_of_the_path():
    x_1 = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    flow = _objective("rectified_flow", "velocity")
    torch.testing.assert_close(prior_log_prob(flow, x_1), Normal(0.0, 1.0).log_prob(x_1).flatten(1).sum(1))
    vp = _objective("vp_cosine", "epsilon")
    b_1 = vp.schedule.b(torch.ones((), dtype=torch.float64))
    torch.testing.assert_close(prior_log_prob(vp, x_1), Normal(0.0, b_1).log_prob(x_1).flatten(1).sum(1))


def test_normalization_log_det_is_the_change_of_variables():
    # latents z ~ N(m, s^2) per channel, normalized = (z - shift) * scale ~ N((m - shift) scale, (s scale)^2):
    # log p_z(z) = log p_normalized(normalized) + H W sum_c log scale_c
    shift, scale = [0.3, -1.0], [0.5, 2.5]
    mean = torch.tensor([1.0, -0.2], dtype=torch.float64).view(1, 2, 1, 1)
    std = torch.tensor([1.5, 0.4], dtype=torch.float64).view(1, 2, 1, 1)
    shift_t = torch.tensor(shift, dtype=torch.float64).view(1, 2, 1, 1)
    scale_t = torch.tensor(scale, dtype=torch.float64).view(1, 2, 1, 1)
    z = mean + std * torch.randn(3, 2, 4, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    normalized = (z - shift_t) * scale_t
    log_p_z = Normal(mean, std).log_prob(z).flatten(1).sum(1)
    log_p_normalized = Normal((mean - shift_t) * scale_t, std * scale_t).log_prob(normalized).flatten(1).sum(1)
    torch.testing.assert_close(log_p_normalized + normalization_log_det(scale, (2, 4, 5)), log_p_z)
    with pytest.raises(ValueError, match="2 scales for 3 latent channels"):
        normalization_log_det(scale, (3, 4, 5))
    with pytest.raises(ValueError, match="positive"):
        normalization_log_det([1.0, 0.0], (2, 4, 5))


def test_bad_arguments_are_rejected(toy):
    objective = _objective("rectified_flow", "velocity")
    model, x = toy.model_fn(objective), _data(toy, 2)
    for kwargs, message in [({"num_steps": 0}, "num_steps"), ({"t_min": 1.0}, "t_min"),
                            ({"trace": "approx"}, "unknown trace"), ({"num_probes": 0}, "num_probes"),
                            ({"probe": "sphere"}, "unknown probe"), ({"integrator": "euler"}, "unknown integrator")]:
        with pytest.raises(ValueError, match=message):
            ode_log_likelihood(model, objective, x, **kwargs)
