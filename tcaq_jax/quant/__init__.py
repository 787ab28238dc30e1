"""Pure functional quantizers (imports nothing from the rest of tcaq_jax).

uniform: affine fake quantization (STE / LSQ); ranges: min-max, percentile, Lp search; adaround: learnable
rounding; log2: log2 / log-sqrt2 quantizers for post-Softmax values; tcr: timestep-channel reparameterization;
daq: power-law vs exponential test choosing log2 or uniform per (layer, step); state: the typed per-layer
quantizer state of a model (QState / LayerQState); intercept: collect what chosen submodules receive in a
forward. See docs/quant.md.
"""
from tcaq_jax.quant.uniform import (QuantConfigError, UniformQuantizer, dequantize, fake_quant,
                                    fake_quant_with, lsq_grad_scale, qrange, quantize, quantize_with, round_ste)
from tcaq_jax.quant.ranges import (lp_error, lp_search_params, minmax_params, params_from_range,
                                   percentile_params, reduce_axes)
from tcaq_jax.quant.adaround import (AdaRoundState, adaround_fake_quant, adaround_fake_quant_with,
                                     adaround_loss_reg, b_schedule, hard_rounding, init_adaround_state, init_alpha,
                                     rounding_regularizer, soft_rounding)
from tcaq_jax.quant.log2 import (LogQuantizer, log2_fake_quant, log2_search_delta, log_codes, log_dequantize,
                                 log_fake_quant, log_fake_quant_with, logsqrt2_fake_quant)
from tcaq_jax.quant.tcr import channel_peaks, scale_activation, scale_kernel_inputs, tcr_ratio
from tcaq_jax.quant.daq import (DAQQuantizer, choice_table, choose_log2, daq_fake_quant, default_x_min,
                                init_daq_quantizer, powerlaw_vs_exponential_llr)
from tcaq_jax.quant.state import LayerQState, QState, merge_layers
from tcaq_jax.quant.intercept import Call, collect_calls
