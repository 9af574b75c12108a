"""Quantized weights and activations.

`nf4`: QLoRA's 4-bit NormalFloat, frozen base weights under PEFT. `uniform`: int8 / int4,
symmetric or affine, per tensor, channel or group, and fake quantization with a straight-through
gradient. `calibrate`: activation ranges from a calibration set (absmax, minmax, percentile, MSE,
KL). Formats here describe how a tensor is stored and read back; the PEFT methods, the trainer
and trainer/quantize.py decide which tensors use them.
"""
