"""Flax NNX MoE model families whose MoE layers are written with the moe_* dialect."""
from moejax.models.decoder import DecoderLayer, MoEConfig, MoEDecoder, tiny_mixtral

__all__ = ["MoEConfig", "MoEDecoder", "DecoderLayer", "tiny_mixtral"]
