"""Noise schedules and samplers against diffusers' DDPM, DDIM and Euler schedulers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from peft_jax.models.diffusion import schedulers as S  # noqa: E402

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _pair(shape=(2, 8, 8, 4), seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_ddpm_training_targets(beta_schedule):
    cfg = S.SchedulerConfig(beta_schedule=beta_schedule, prediction_type="v_prediction")
    ref = diffusers.DDPMScheduler(beta_start=cfg.beta_start, beta_end=cfg.beta_end, beta_schedule=beta_schedule)
    np.testing.assert_allclose(S.alphas_cumprod(cfg), ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7)
    x0, noise = _pair()
    t = np.array([0, 999])
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(np.asarray(S.add_noise(cfg, x0, noise, t)), want, atol=1e-5)
    want_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(np.asarray(S.training_target(cfg, x0, noise, t)), want_v, atol=1e-5)
    eps_cfg = S.SchedulerConfig(beta_schedule=beta_schedule)
    np.testing.assert_array_equal(np.asarray(S.training_target(eps_cfg, x0, noise, t)), noise)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_steps(spacing, prediction_type):
    kw = dict(SD, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1, set_alpha_to_one=False,
              clip_sample=False)
    ref = diffusers.DDIMScheduler(**kw)
    ref.set_timesteps(10)
    ours = S.DDIMSampler(S.SchedulerConfig(**kw), 10)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    x, out = _pair(seed=1)
    for i, t in enumerate(ref.timesteps):
        want = ref.step(torch.from_numpy(out), t, torch.from_numpy(x)).prev_sample.numpy()
        np.testing.assert_allclose(np.asarray(ours.step(jnp.asarray(out), i, jnp.asarray(x))), want, atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_steps(spacing, prediction_type):
    kw = dict(SD, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1)
    ref = diffusers.EulerDiscreteScheduler(**kw)
    ref.set_timesteps(10)
    ours = S.EulerSampler(S.SchedulerConfig(**kw), 10)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-5)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-5)
    x, out = _pair(seed=2)
    for i, t in enumerate(ref.timesteps):
        xt = torch.from_numpy(x)
        want_in = ref.scale_model_input(xt, t).numpy()
        np.testing.assert_allclose(np.asarray(ours.scale_input(jnp.asarray(x), i)), want_in, rtol=1e-5, atol=1e-6)
        want = ref.step(torch.from_numpy(out), t, xt).prev_sample.numpy()
        np.testing.assert_allclose(np.asarray(ours.step(jnp.asarray(out), i, jnp.asarray(x))), want, rtol=1e-4,
                                   atol=1e-4)


def test_sampling_loop_with_guidance():
    """With a denoiser that predicts a fixed fraction of its input, the jitted loop equals a Python loop over
    diffusers' DDIM steps, and guidance combines the two halves of the batch as uncond + s (cond - uncond)."""
    cfg = S.SchedulerConfig()
    sampler = S.DDIMSampler(cfg, 5)

    def denoise(x, t, ctx):
        return 0.1 * x + ctx.mean(axis=(1, 2))[:, None, None, None]

    cond, uncond = jnp.ones((1, 3, 2)), jnp.zeros((1, 3, 2))
    key = jax.random.key(0)
    got = jax.jit(lambda k: S.sample(denoise, sampler, cond, uncond, shape=(1, 4, 4, 2), key=k,
                                     guidance_scale=3.0))(key)
    ref = diffusers.DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    ref.set_timesteps(5)
    x = torch.from_numpy(np.array(jax.random.normal(key, (1, 4, 4, 2))))
    for t in ref.timesteps:
        out = 0.1 * x + 3.0 * 1.0  # uncond: 0.1 x; cond: 0.1 x + 1
        x = ref.step(out, t, x).prev_sample
    np.testing.assert_allclose(np.asarray(got), x.numpy(), atol=1e-4)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        S.SchedulerConfig(prediction_type="sample")
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        S.SchedulerConfig.from_diffusers({"rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="unknown sampler"):
        S.make_sampler("pndm", S.SchedulerConfig(), 10)
