"""Defaults for every run. Recipes import this and override what differs.

Every key here can be set from the command line: `--config.train.steps=100`. A key that does not
exist is an error (the config is locked), so a typo never becomes a silent default.
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()

  # The model's shape (models/config.py: ModelConfig). Defaults are Llama-3-8B's.
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=128256,  # vocabulary size; 0: the tokenizer's
      d_model=4096,  # width of the residual stream
      n_layers=32,  # decoder blocks
      n_heads=32,  # query heads
      n_kv_heads=8,  # key/value heads (grouped-query attention when fewer than n_heads)
      head_dim=0,  # width of each head; 0: d_model // n_heads
      d_ff=14336,  # hidden width of the gated MLP
      max_seq_len=8192,  # longest position the model is built for (train.seq_len must fit)
      norm_eps=1e-5,  # RMSNorm epsilon
      alibi=False,  # BLOOM: attention scores minus slope_h x distance, instead of RoPE
      rope_theta=500000.0,  # RoPE base
      rope_local_theta=0.0,  # Gemma 3: the sliding-window layers' own base; 0: rope_theta
      # none | linear (position interpolation) | ntk (NTK-aware) | dynamic (dynamic NTK) | llama3
      # | yarn | longrope (Phi-3); with model.init_from, a setting here rescales the folder's
      rope_scaling="none",
      rope_factor=1.0,  # how many times the context grows
      rope_original_max_len=8192,  # the context length the model was trained at
      rope_low_freq_factor=1.0,  # llama3: wavelengths above original / this are scaled
      rope_high_freq_factor=4.0,  # llama3: wavelengths below original / this are kept
      rope_beta_fast=32.0,  # yarn: frequencies turning more often than this over original: kept
      rope_beta_slow=1.0,  # yarn: ... less often than this: interpolated; a ramp between
      rope_truncate=True,  # yarn: the ramp's ends rounded to whole dimensions
      rope_attention_factor=0.0,  # yarn, longrope: cos and sin times this; 0: the method's own
      rope_long_factor=(),  # longrope: one divisor per frequency past the original length
      rope_short_factor=(),  # longrope: ... within it
      qkv_bias=False,  # biases on the q, k, v projections (Qwen2)
      tie_embeddings=False,  # the output head is the embedding table transposed
      sliding_window=0,  # attend to at most this many previous positions (Mistral); 0: all
      sliding_window_layers=(),  # layers with the window; (): all
      # the Hugging Face layout on export: llama | mistral | qwen2 | qwen3 | phi3 | olmo2 | gemma
      # | gemma2 | gemma3 | bloom | mixtral | qwen2_moe | qwen3_moe
      family="llama",
      norm_offset=False,  # Gemma: RMSNorm scales by 1 + weight
      mlp_activation="silu",  # silu (SwiGLU) | gelu_tanh (GeGLU, Gemma)
      embed_scale=False,  # Gemma: embeddings times sqrt(d_model)
      query_scale=0.0,  # 0: head_dim ** -0.5
      attn_softcap=0.0,  # Gemma 2: 50
      logit_softcap=0.0,  # Gemma 2: 30
      post_norms=False,  # Gemma 2: RMSNorm on attention and MLP outputs too
      pre_norms=True,  # RMSNorm on attention and MLP inputs (OLMo 2: off, outputs only)
      layer_norm=False,  # BLOOM: LayerNorm (mean removed, a bias) instead of RMSNorm
      embed_norm=False,  # BLOOM: a norm on the embeddings before the first layer
      mlp_gated=True,  # False (BLOOM): down(act(up(x))), no gate
      out_bias=False,  # BLOOM: biases on the attention output and the MLP's projections
      qk_norm=False,  # Qwen3: RMSNorm over head_dim on queries and keys before rope
      qk_norm_full=False,  # OLMo 2: that norm over all heads at once
      value_head=False,  # a score head instead of the LM head (train.objective=reward sets it)
      # Mixture of experts (models/moe.py); n_experts=0: the dense MLP in every layer
      n_experts=0,  # routed experts per MoE layer
      experts_per_token=2,  # top-k
      expert_d_ff=0,  # each routed expert's hidden width; 0: d_ff
      shared_expert_d_ff=0,  # an always-on shared expert of this width; 0: none
      shared_expert_gate=False,  # Qwen2-MoE: the shared expert scaled by sigmoid(x @ w)
      moe_every=1,  # layer i is MoE when (i + 1) % moe_every == 0 ...
      moe_first_dense=0,  # ... and i >= moe_first_dense
      router_order="softmax_topk",  # softmax then top-k | topk_softmax: top-k logits, softmax
      router_norm_topk=True,  # renormalise the k router weights to sum 1
      router_jitter=0.0,  # training: MoE inputs times uniform(1 - j, 1 + j)
      router_aux_loss_weight=0.0,  # Switch load-balancing loss (1.0 x k when balanced)
      router_z_loss_weight=0.0,  # router z-loss: mean logsumexp(logits)^2
      router_bias_update_rate=0.0,  # DeepSeek-V3 routing bias: its step per train step; 0: off
      router_batch_balance=0,  # training: each batch's routing balanced in this many rounds
      moe_impl="dropless",  # dropless (grouped matmuls) | capacity (drops overflow) | dense
      capacity_factor=1.25,  # moe_impl=capacity: slots per expert x tokens * k / n_experts
      grouped_matmul="auto",  # dropless kernel: auto | blocks (CPU) | ragged_dot | tokamax
      init_std=0.02,  # normal init scale of weights (output projections divided by sqrt(2 layers))
      remat="dots_no_batch",  # keep projection outputs, recompute the rest | none | full | dots
      init_from="",  # "hf:DIR": start from a Hugging Face folder (its shape, weights, tokenizer)
      attention_impl="xla",  # xla | pallas (FlashMask kernel) | cudnn (NVIDIA GPUs) | ring
  ))

  # Parameter-efficient fine-tuning (models/peft): which weights train.
  c.peft = ml_collections.ConfigDict(dict(
      # none (full fine-tuning) | lora | relora | dora | adalora | vera | ia3 | bitfit | adapter
      # (Houlsby) | fusion (AdapterFusion) | mam (MAM adapter) | unipelt | lisa | prompt (prompt
      # tuning) | ptuning (P-tuning) | prefix (prefix tuning, P-tuning v2)
      method="none",
      targets="all-linear",  # regex over module names (attn.q or q_proj, ...) | all-linear;
      # mixtures of experts: experts.gate|up|down (one pair per expert), shared.gate|up|down
      train_router=False,  # mixtures of experts: the routers train too (PEFT: modules_to_save)
      rank=8,  # adalora: the initial rank
      alpha=16.0,  # LoRA scale alpha / rank (alpha / sqrt(rank) with rslora)
      rslora=False,  # rank-stabilised LoRA: scale alpha / sqrt(rank)
      dropout=0.0,  # lora, adalora: dropout on the low-rank path's inputs (training only)
      init="default",  # default (A uniform, B 0) | gaussian | pissa (top-r SVD of W)
      pissa_niter=0,  # pissa: 0 exact SVD; N > 0 randomized SVD with N power iterations (fast)
      lora_plus_scale=1.0,  # LoRA+: B's learning rate is this times A's
      adalora_target_rank=4,  # adalora: average rank per matrix at the end of the schedule
      adalora_tinit=0,  # adalora: steps at full rank before the budget starts shrinking
      adalora_tfinal=0,  # adalora: last steps with the final rank pattern fixed
      adalora_delta_t=1,  # adalora: steps between reallocations
      adalora_beta1=0.85,  # adalora: EMA of the sensitivity |w * grad|
      adalora_beta2=0.85,  # adalora: EMA of its uncertainty
      adalora_orth_weight=0.5,  # adalora: orthogonality penalty on P and Q
      vera_rank=256,  # vera: rank of the shared frozen random matrices
      vera_d_initial=0.1,  # vera: initial value of the trained scaling vector d
      ia3_targets="k_proj|v_proj|down_proj",  # ia3 scales these (down_proj on its input side)
      base_quant="none",  # nf4: targeted base weights stored in 4 bits (QLoRA)
      relora_every=100,  # relora: steps between merging the adapters into the base
      relora_prune=0.99,  # relora: share of the adapters' Adam moments zeroed at each merge
      relora_warmup=10,  # relora: steps of linear warmup after each merge (a jagged schedule)
      adapter_dim=16,  # adapter, fusion, mam, unipelt: the bottleneck adapters' size
      adapter_drop=0,  # adapter, fusion: no adapters in this many lowest layers (AdapterDrop)
      fusion_adapters="",  # fusion: comma-separated folders of adapters to fuse (method adapter
      # runs written by trainer.export --format=adapters)
      mam_scale=4.0,  # mam: scale of the parallel FFN adapter
      num_virtual_tokens=20,  # prompt, ptuning, prefix, mam, unipelt: virtual tokens
      prompt_init="vocab",  # prompt, ptuning: vocab (embeddings of random tokens) | random
      ptuning_encoder="mlp",  # ptuning: mlp | lstm
      encoder_hidden=0,  # ptuning, prefix projection: encoder width; 0: the token width
      prefix_projection=False,  # prefix, mam, unipelt: make the prefix with an MLP (else stored)
      lisa_activated_layers=2,  # lisa: layers that train at a time (+ embeddings, head)
      lisa_step_interval=20,  # lisa: steps between redrawing them
  ))

  # Quantization-aware training (models/quant/; post-training quantization: trainer/quantize.py).
  c.quant = ml_collections.ConfigDict(dict(
      mode="none",  # qat: fake-quantized projections | qt: their matmuls quantized (qwix)
      bits=8,  # qat: weight bits, 8 or 4 (qt: 8)
      group_size=0,  # qat: inputs per weight scale; 0 per output channel, -1 per tensor
      symmetric=True,  # qat: absmax scales (False: scale and zero point)
      activations="token",  # qat: projection inputs to int8 with a scale per token | "" (float)
  ))

  # Where tokens come from (trainer/data/).
  c.data = ml_collections.ConfigDict(dict(
      # stdlib: the Python standard library's source (offline, real text) | files | prepared
      # (folders python -m trainer.data.prepare wrote, in train_files / eval_files)
      source="stdlib",
      max_chars=4_000_000,  # stdlib: characters of training text to read
      train_files="",  # files: paths, folders or globs, comma-separated; each entry a dataset
      eval_files="",  # files: "" holds out eval_percent of every training dataset
      train_weights="",  # mixture weights, one per train_files entry; "": by size
      eval_percent=5.0,  # share held out for eval
      format="text",  # text | chat (messages) | preference (prompt/chosen/rejected)
      text_field="text",  # the record fields holding each part, as your data names them
      messages_field="messages",  # chat: the list of {role, content} turns
      prompt_field="prompt",  # preference: the shared prompt
      chosen_field="chosen",  # preference: the preferred answer
      rejected_field="rejected",  # preference: the other answer
      template="chatml",  # chat: llama3 | chatml | gemma | plain
      packing="concat",  # none (pad each example) | concat (no padding) | greedy (best fit)
      pack_group=512,  # greedy: examples buffered per packing group
      truncation="split",  # longer than a row: split | truncate | drop (counted)
      skip_bad_records=False,  # a bad record (JSON, UTF-8, field, type, role) is skipped, counted
      text_split="blank_line",  # text files: a blank line ends a document | line (each) | file
      num_threads=2,  # grain reader threads
      tokenizer="",  # a SentencePiece .model or HF tokenizer.json (or a folder); "": train one
      tokenizer_vocab_size=4096,  # when training a tokenizer
  ))

  # The run: objective, length, optimizer (AdamW + clipping), logging, eval, checkpoints.
  c.train = ml_collections.ConfigDict(dict(
      # lm (every weighted token) | sft (chat: assistant tokens) | dpo | reward | grpo | ppo
      # (online RL) | distill (from a teacher) (trainer/objectives/)
      objective="lm",
      steps=1000,  # optimizer steps (0: only evaluate the starting weights, e.g. model.init_from)
      batch_size=8,  # global, in sequences
      seq_len=512,  # tokens per sequence (row)
      grad_accum=1,  # microbatches per step, accumulated inside the step
      lr=3e-4,  # peak learning rate
      lr_schedule="cosine",  # cosine | linear | constant (after warmup)
      warmup_steps=100,  # linear warmup from 0
      min_lr_ratio=0.1,  # the schedule ends at lr * this
      weight_decay=0.1,  # AdamW decoupled weight decay (not on norms and biases)
      b1=0.9,  # AdamW beta1
      b2=0.95,  # AdamW beta2
      eps=1e-8,  # AdamW epsilon
      clip_norm=1.0,  # global-norm clipping; 0 turns it off
      seed=0,  # parameter init, data order, dropout and sampling
      log_every=10,  # steps between metrics lines (metrics.jsonl, TensorBoard, progress bar)
      eval_every=200,  # 0: only at the end
      eval_batches=8,  # batches per evaluation
      neftune_alpha=0.0,  # NEFTune: noise alpha / sqrt(length * d_model) on input embeddings (5)
      eval_exact_match=0,  # chat data: held-out examples scored by exact match of the reply
      checkpoint_every=500,  # 0: only at the end
      keep_checkpoints=3,  # newest checkpoints kept
      max_nonfinite_steps=20,  # stop after this many steps in a row with NaN/Inf (0: never)
      stop_after_steps=0,  # >0: run at most this many steps, checkpoint, stop; rerun to go on
      memory_check=True,  # refuse a run whose estimated memory per device exceeds the device's
      sample_prompt="def ",  # text the run continues at the end, as a quick look at the model
      sample_tokens=64,  # tokens of that sample (0: none)
      sample_temperature=0.8,  # its sampling temperature
      peak_tflops=0.0,  # per device, for MFU; 0: data sheet for known chips, measured on CPU
  ))

  # Supervised fine-tuning (train.objective=sft).
  c.sft = ml_collections.ConfigDict(dict(
      normalize="token",  # token: every assistant token counts once | sequence: every example
  ))

  # Online RL (train.objective=grpo: trainer/objectives/grpo.py; ppo: ppo.py).
  c.rl = ml_collections.ConfigDict(dict(
      prompts="",  # jsonl of chats, the last message the expected answer; "": data.train_files
      group_size=4,  # completions sampled per prompt (G)
      groups_per_row=1,  # prompts per row: a step samples train.batch_size x this many prompts
      max_new_tokens=16,  # longest completion
      temperature=1.0,  # sampling temperature (the loss's log-probs use it too)
      top_k=0,  # sampling: 0 = all tokens
      top_p=1.0,  # sampling: nucleus mass
      reward="exact",  # exact (the reply is the expected answer) | module:function
      loss_type="grpo",  # grpo | bnpo | dr_grpo (Dr. GRPO) | dapo (token-level)
      level="token",  # importance ratio per token | sequence (GSPO)
      eps_low=0.2,  # ratio clipped to [1 - eps_low, 1 + eps_high]
      eps_high=0.2,  # DAPO's clip-higher: 0.28
      beta=0.04,  # KL (k3) to the frozen reference; 0: no reference model
      scale_rewards="group",  # advantages / the group's std | batch | none (Dr. GRPO)
      dynamic_sampling=False,  # DAPO: groups whose rewards are all equal leave the loss
      max_draws=4,  # dynamic_sampling: draws of prompts (after the first, random) to fill a step
      overlong_buffer=0,  # DAPO's soft overlong penalty over the last this many tokens; 0: off
      overlong_factor=1.0,  # ... reaching -this at rl.max_new_tokens
      length_penalty=0.0,  # reward minus this x length / rl.max_new_tokens
      iterations=1,  # train steps (optimizer updates) per rollout; > 1: the ratio moves off 1
      # ppo only:
      reward_model="",  # a train.objective=reward run's folder: its score is the reward
      critic="reward",  # the critic starts from: reward (the reward model) | policy (zero head)
      critic_lr=0.0,  # the critic's own optimizer's peak rate; 0: train.lr
      gamma=1.0,  # GAE discount
      lam=0.95,  # GAE lambda
      vf_coef=0.1,  # value loss weight (the policy loss's clip is rl.eps_low)
      cliprange_value=0.2,  # values clipped to the rollout's +- this
      entropy_coef=0.0,  # entropy bonus
      kl_coef=0.05,  # per-token KL penalty in the reward (the adaptive controller's start)
      kl_target=0.0,  # > 0: adaptive KL coefficient aiming at this KL per completion
      kl_horizon=10000,  # the adaptive controller's horizon (completions)
      whiten_advantages=True,  # advantages standardised over each rollout
      missing_stop_penalty=0.0,  # score minus this for a reply cut off at rl.max_new_tokens
      normalize_reward=True,  # a reward model's scores / the first rollout's mean and std
  ))

  # Distillation from a frozen teacher (train.objective=distill; trainer/objectives/distill.py).
  c.distill = ml_collections.ConfigDict(dict(
      teacher="",  # a training run's folder or hf:DIR; it must share the run's tokenizer
      loss="forward_kl",  # forward_kl (KL(teacher || student)) | reverse_kl | jsd
      beta=0.5,  # jsd: the generalized JSD's mixing weight (0 forward KL, 1 reverse KL)
      temperature=1.0,  # both distributions softened by this
      on_policy=False,  # the student samples replies to the chats (rl.* sampling settings)
  ))

  # Preference optimisation (train.objective=dpo; data.format=preference).
  c.dpo = ml_collections.ConfigDict(dict(
      loss="sigmoid",  # sigmoid (DPO) | ipo | simpo | orpo (the last two need no reference)
      beta=0.1,  # strength of the KL constraint to the reference (DPO's beta)
      label_smoothing=0.0,  # sigmoid, simpo: conservative DPO's eps
      simpo_gamma=0.5,  # simpo: target reward margin
      precompute_ref=False,  # reference log-probs from one pass before training, not per step
  ))

  # Mixed precision: what the matmuls run in and what the weights are kept in.
  c.precision = ml_collections.ConfigDict(dict(
      compute_dtype="float32",  # float32 | bfloat16 | float16 (with dynamic loss scaling)
      param_dtype="float32",  # master weights and optimizer state
      loss_scale=2.0**15,  # float16: the initial loss scale (halved on overflow)
      loss_scale_period=2000,  # float16: finite steps in a row before the scale doubles
  ))

  # Device mesh: axis sizes (-1 = all devices left over) and the sharding strategy.
  c.mesh = ml_collections.ConfigDict(dict(
      stage=1,  # pipeline stages: the layers split into this many consecutive groups
      pipeline_schedule="gpipe",  # gpipe | circular | 1f1b (parallel/pipeline.py; README)
      pipeline_repeats=1,  # circular: layer chunks per stage (a microbatch goes round this often)
      microbatches=0,  # pipeline microbatches; 0: train.grad_accum if > 1, else mesh.stage
      data=-1,  # data parallelism: the batch split, everything else per the strategy
      fsdp=1,  # fully sharded data parallelism: the batch and (fsdp strategies) the weights
      expert=1,  # expert parallelism (MoE layers' experts)
      sequence=1,  # sequence/context parallelism (ring attention)
      tensor=1,  # tensor parallelism (fsdp_tp strategies)
      strategy="dp",  # dp | zero1 | zero2 | fsdp | fsdp_tp | fsdp_tp_sp | ep (parallel/rules.py)
      rules="",  # overrides on top of the preset: "embed=fsdp,mlp=tensor,batch=data+fsdp"
      offload_optimizer=False,  # keep optimizer state in host memory between steps
  ))
  return c
