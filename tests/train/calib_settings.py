"""Calibration settings shared by the pipeline tests: ddim_tiny with random weights, a 6-step sampler, and a
policy that quantizes three reconstruction units (a ResBlock, the mid attention block with DAQ, an up-path
ResBlock with the split concat shortcut) and keeps the rest FP."""

UNITS = ['down_0/block_0', 'mid/attn_1', 'up_0/block_1']
BASE = dict(model_config='ddim_tiny', num_steps=6, calib_steps=2, calib_samples=4, capture_batch=4,
            forward_batch=8, act_batch=4, iters_scale=0.001, chunk=10, par_rounds=1, png_samples=2,
            eval_units=False, seed=3, eps_bias_samples=8, gate_samples=8, eps_scale=False,
            policy_override=('.*:fp', '^down_0/block_0/:w4a8', '^mid/attn_1/:w4a8', '^up_0/block_1/:w4a8'))
