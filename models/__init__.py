"""Flax NNX MoE model families whose MoE layers are written with the moe_* dialect.

* :class:`MoEConfig` / :class:`MoEDecoder`: one config-driven decoder covering Mixtral
  (and Switch-style top-1), Qwen1.5/Qwen2/Qwen3-MoE, OLMoE, DeepSeekMoE, DeepSeek-V2/V3 and
  Kimi K2 (MLA, YaRN), GLM-4.5, MiniMax-M2, DBRX and JetMoE (attention experts). See
  models/README.md for what each family maps to.
* :mod:`moejax.models.presets`: published full-size configs and tiny test configs;
  :func:`abstract_model` builds one with shapes only.
* :func:`from_pretrained` / :func:`save_pretrained_hf`: Hugging Face safetensors checkpoints
  (FP8 block-scaled experts kept as FP8; ``mesh=`` loads each process's slices onto a device
  mesh); :func:`check_checkpoint` validates a folder without reading tensors;
  :mod:`moejax.models.export_hf` writes optimized models back; :mod:`moejax.models.tokenizer`
  reads a checkpoint's ``tokenizer.json``.
* :func:`generate`: prefill plus KV-cache decoding; :func:`stream` yields tokens as they come.
* :func:`is_byte_level`: whether a loaded model's token ids are raw bytes (bits per byte apply).
* :class:`CheckpointError`: a checkpoint file is missing, corrupt or malformed (one-line message).
"""
from moejax.models.abstract import abstract_model
from moejax.models.byte_level import is_byte_level
from moejax.models.decoder import DecoderLayer, MoEConfig, MoEDecoder, tiny_mixtral
from moejax.models.default_model import (BUNDLED_MODELS, DEFAULT_MODEL_DIR, FINE_GRAINED_MODEL_DIR,
                                         load_bundled_model, load_default_model)
from moejax.models.generation import generate, sample_next, stream
from moejax.models.hf import SUPPORTED_ARCHITECTURES, check_checkpoint, config_from_hf, from_pretrained, save_pretrained_hf
from moejax.models.validation import CheckpointError

__all__ = ["load_default_model", "load_bundled_model", "BUNDLED_MODELS", "DEFAULT_MODEL_DIR", "FINE_GRAINED_MODEL_DIR", "MoEConfig", "MoEDecoder", "DecoderLayer", "tiny_mixtral", "generate", "stream", "sample_next", "from_pretrained", "check_checkpoint",
           "save_pretrained_hf", "config_from_hf", "SUPPORTED_ARCHITECTURES", "CheckpointError", "is_byte_level", "abstract_model"]
