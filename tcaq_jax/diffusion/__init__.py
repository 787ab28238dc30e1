"""Noise schedules, the DDIM sampler (one jitted lax.scan, sharded over local devices) and calibration capture.

  from tcaq_jax.diffusion import DDIMSampler, sampler_coefficients, capture, CalibData
"""
from tcaq_jax.diffusion.capture import CalibData, CaptureError, capture, select_steps
from tcaq_jax.diffusion.ddim import (DDIMSampler, SamplerError, as_partial, ddim_trajectory, initial_noise,
                                     sample_keys, sampler_coefficients)
from tcaq_jax.diffusion.batched import sample_all, sample_batches
from tcaq_jax.diffusion.host_sampler import HostLoopSampler, make_sampler
from tcaq_jax.diffusion.schedules import (DDIMCoefficients, ScheduleError, alphas_cumprod, beta_schedule,
                                          ddim_coefficients, ddim_timesteps, schedule_from_config)

__all__ = ['CalibData', 'CaptureError', 'capture', 'select_steps', 'DDIMSampler', 'SamplerError', 'as_partial',
           'ddim_trajectory', 'initial_noise', 'sample_keys', 'sampler_coefficients', 'DDIMCoefficients',
           'ScheduleError', 'alphas_cumprod', 'beta_schedule', 'ddim_coefficients', 'ddim_timesteps',
           'schedule_from_config', 'HostLoopSampler', 'make_sampler', 'sample_batches', 'sample_all']
