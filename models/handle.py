"""A model as the trainer, exporter and sampler see it: its static half and parameter dicts.

Parameters travel as plain nested dicts of arrays (`nnx.to_pure_dict`): optax, orbax,
safetensors export and PEFT masks all work on them directly. `ModelHandle` keeps the static
half (the NNX graph, an abstract state and each parameter's logical axes) so a module can be
rebuilt from any such dict (`bind`), also inside `jax.jit`, and the `Execution` it runs with.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from models.config import Execution, ModelConfig
from models.decoder import Decoder, cast_floating  # noqa: F401 (re-exported)
from models.peft import Peft
from models.peft.model import PeftModel
from models.quant.model import QuantModel, Quantized, integers
from parallel import rules as rules_lib

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelHandle:
  cfg: ModelConfig
  graphdef: Any
  template: Any  # nnx.State of ShapeDtypeStruct
  axes: Params  # logical axis names of each parameter, same tree as the params
  peft: Peft | None = None  # adapters, stored under params["peft"]
  run: Execution = Execution()  # how the model runs (remat, attention_impl, init_std)
  quant: Quantized | None = None  # projection weights stored as integers (trainer/quantize.py)

  @property
  def integers(self) -> Quantized | None:
    """The quantization whose integers and scales the parameters hold; None for float weights
    (also under QAT's or qt's quantization, which train floats)."""
    return integers(self.quant)

  def abstract_params(self) -> Params:
    params = nnx.to_pure_dict(self.template)
    if self.integers is not None:
      layers = jax.eval_shape(lambda l: self.quant.quantize_layers(self.cfg, l), params["layers"])
      return {**params, "layers": layers}
    if self.peft is not None:
      params, _ = self.peft.base_abstract(params, None)
      if self.peft.method != "bitfit":
        params["peft"] = self.peft.abstract()
    return params

  def bind(self, params: Params):
    """The module with these parameters. With PEFT, a `PeftModel`: the same methods, with
    adapters folded into each layer's weights inside the decoder's scan. The template is never
    modified."""
    state = jax.tree.map(lambda x: x, self.template)
    if self.quant is not None:
      nnx.replace_by_pure_dict(state, {k: v for k, v in params.items() if k != "layers"})
      return QuantModel(nnx.merge(self.graphdef, state), self.quant, params)
    if self.peft is None:
      nnx.replace_by_pure_dict(state, params)
      return nnx.merge(self.graphdef, state)
    outside = {k: v for k, v in params.items() if k not in ("layers", "peft")}
    nnx.replace_by_pure_dict(state, outside)  # the layers keep their abstract template
    return PeftModel(nnx.merge(self.graphdef, state), self.peft, params)


def model_handle(cfg: ModelConfig, peft: Peft | None = None,
                 run: Execution | None = None, quant: Quantized | None = None) -> ModelHandle:
  """The handle of a `cfg` model (with `peft` adapters, or with `quant`'s integer weights) that
  runs as `run` says (default: Execution(): no remat, xla attention)."""
  run = run or Execution()
  if quant is not None and peft is not None:
    raise ValueError("a quantized model (trainer/quantize.py) takes no PEFT adapters")
  if peft is not None:
    peft.check_run(run)
  abstract = nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0), run))
  graphdef, template = nnx.split(abstract)
  axes: Params = {}
  for path, variable in nnx.to_flat_state(template):
    node = axes
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = tuple(variable.get_metadata()["out_sharding"])
  if peft is not None:
    _, axes = peft.base_abstract(nnx.to_pure_dict(template), axes)
    if peft.method != "bitfit":
      axes["peft"] = peft.axes()
  if quant is not None and not quant.fake:  # integers and scales: split over layers only
    stored = jax.eval_shape(lambda l: quant.quantize_layers(cfg, l),
                            nnx.to_pure_dict(template)["layers"])
    for module, name in quant.targets:
      axes["layers"][module][name] = jax.tree.map(
          lambda x: ("layers",) + (None,) * (x.ndim - 1), stored[module][name])
  return ModelHandle(cfg, graphdef, template, axes, peft, run, quant)


def stored_abstract(handle: ModelHandle, dtype, shardings: Params | None = None) -> Params:
  """ShapeDtypeStructs of the parameters as a run stores them: floating ones in `dtype`, stored
  integers (NF4 codes) in theirs; with `shardings`, carrying them (a restore target)."""
  def one(x, sharding=None):
    kept = x.dtype if not jnp.issubdtype(x.dtype, jnp.floating) else jnp.dtype(dtype)
    return jax.ShapeDtypeStruct(x.shape, kept, sharding=sharding)
  if shardings is None:
    return jax.tree.map(one, handle.abstract_params())
  return jax.tree.map(one, handle.abstract_params(), shardings)


def is_axes(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(a, str) or a is None for a in x)


def param_shardings(handle: ModelHandle, mesh: Mesh, rules: rules_lib.Rules) -> Params:
  """A NamedSharding per parameter (or per same-shaped gradient or optimizer moment)."""
  return jax.tree.map(lambda names, x: rules_lib.sharding(names, mesh, rules, x.shape),
                      handle.axes, handle.abstract_params(), is_leaf=is_axes)


def init_params(handle: ModelHandle, seed: int, shardings: Params | None = None,
                dtype=jnp.float32, base: Params | None = None,
                model_shardings: Params | None = None) -> Params:
  """Initialise directly into the target shardings: no host holds the whole model. `base`:
  model weights to start from (e.g. a Hugging Face import) instead of random ones; adapters are
  added to either when the handle has PEFT (whose stored layout `shardings` describes, while
  `model_shardings` places the plain model's weights before that)."""
  if handle.peft is None:
    model_shardings = shardings
  if base is None:
    def init(key):
      params = nnx.to_pure_dict(
          nnx.split(Decoder(handle.cfg, nnx.Rngs(params=key), handle.run))[1])
      return cast_floating(params, dtype)
    base = jax.jit(init, out_shardings=model_shardings)(jax.random.PRNGKey(seed))
  if handle.peft is None:
    return base

  def add_adapters(base, key, fixed):
    new_base, adapters = handle.peft.init(base, key, fixed)
    return cast_floating({**new_base, **({"peft": adapters} if adapters else {})}, dtype)

  fixed = handle.peft.load_fixed()  # AdapterFusion's stage-1 adapters, from their folders
  return jax.jit(add_adapters, out_shardings=shardings, donate_argnums=0)(
      base, jax.random.PRNGKey(seed + 7), fixed)
