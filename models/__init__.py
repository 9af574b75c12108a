"""Flax NNX decoder models. Models take a `ModelConfig`, never the run config."""

from models.config import ModelConfig
from models.decoder import Context, Decoder
