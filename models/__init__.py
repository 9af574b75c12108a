"""Flax NNX decoder models. Models take a `ModelConfig` (what the weights are) and an `Execution`
(how they run), never the run config."""

from models.config import Execution, ModelConfig
from models.decoder import Context, Decoder
