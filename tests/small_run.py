"""A run config small enough for tests: `configs/tiny.py:smoke`, with overrides."""

from configs import tiny


def config(**train):
  c = tiny.get_config("smoke")
  c.train.update(**train)
  return c
