"""Force 8 CPU devices before jax is imported anywhere, so mesh tests run on any machine."""

import os

# LLVM at -O1, as trainer/train.py compiles its steps on CPU: compiling is most of this suite.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=1").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# The default suite must stay under 20 minutes on 2 cores (README). These end-to-end cases took
# 17-41 s each there (2026-12-03, an AMD Zen 5 host, `--durations`), and each has a cheaper
# sibling checking the same code in the default suite; they run with `pytest -m slow`, which
# .ci/run runs after the default suite, so none goes unrun.
MOVED_TO_SLOW = (
    "tests/test_peft_moe.py::test_trainer_steps_change_only_the_adapters[qlora]",
    "tests/test_hf.py::test_context_extension_from_a_folder_trains_with_ring_attention_and_exports",
    "tests/test_quantize.py::test_qat_trains_through_fake_quantization_and_stores_what_it_trained",
    "tests/test_relora.py::test_a_run_merges_into_a_high_rank_update_and_resumes_bit_for_bit",
    "tests/test_preference.py::test_shared_prompt_rows_give_each_answer_its_own_sequence[pallas]",
    "tests/test_pipeline.py::test_pipelined_steps_equal_the_unpipelined_run[1f1b stage 2 x fsdp 2]",
    "tests/test_peft.py::test_each_method_trains_only_its_parameters"
    "[adalora_dropout-section3-0.02-20]",
    "tests/test_distill.py::test_on_policy_rows_are_the_students_samples",
    "tests/test_quantize.py::test_a_quantized_model_is_its_dequantized_float_model",
    "tests/test_pipeline.py::test_pipelined_steps_equal_the_unpipelined_run[gpipe stage 2]",
    "tests/test_peft_unified.py::test_kv_cache_decoding_equals_the_full_forward[unipelt]",
    "tests/test_peft.py::test_exports_load_in_hf_peft_and_transformers[dora]",
    "tests/test_generate.py::test_longrope_generation_runs_the_sequence_again_past_the_original_"
    "length",
    "tests/test_ppo.py::test_python_reward_and_a_critic_from_the_policy",
    "tests/test_peft_moe.py::test_training_split_path_equals_folded_weights",
    "tests/test_model.py::test_attention_backward_matches_autodiff_of_the_plain_reference"
    "[none-False]",
    "tests/test_ppo.py::test_lora_actor_uses_its_adapters_off_as_reference",
    "tests/test_peft_unified.py::test_kv_cache_decoding_equals_the_full_forward[drop]",
    "tests/test_quantize.py::test_qt_training_follows_float_training",
    "tests/test_peft.py::test_each_method_trains_only_its_parameters[qlora-section7-0.02-20]",
    "tests/test_moe.py::test_a_train_step_moves_the_bias_by_that_steps_loads",
    "tests/test_quantize.py::test_the_eval_loop_measures_a_quantized_folder_as_its_dequantized_"
    "model",
)


@pytest.hookimpl(tryfirst=True)  # before `-m 'not slow'` deselects by mark
def pytest_collection_modifyitems(config, items):
  moved = set(MOVED_TO_SLOW)
  for item in items:
    if item.nodeid in moved:
      item.add_marker(pytest.mark.slow)
