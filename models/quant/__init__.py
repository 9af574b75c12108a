"""Quantized storage of weights: `nf4` (QLoRA's 4-bit NormalFloat, frozen base weights under
PEFT). Formats here describe how a weight is stored and read back; the PEFT methods and the
trainer decide which weights use them."""
