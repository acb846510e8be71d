"""Checkpoints: Hugging Face directories in and out, and diffujax's own (orbax) checkpoint.

    convert(hf_dir, ckpt)                 # HF -> diffujax (adds a mask token unless told otherwise)
    export(ckpt, hf_dir)                  # diffujax -> HF, bit-exact for an unchanged model
    config, params = load(ckpt, shardings=...)   # params: the parameter tree (nested dicts)
    save(ckpt, config, params, tokenizer_from=hf_dir)
    config, params = from_state_dict(hf_config_dict, torch_model.state_dict())   # in memory
"""

from diffujax.checkpoint.convert import convert, export, from_state_dict, to_state_dict
from diffujax.checkpoint.errors import CheckpointError
from diffujax.checkpoint.store import load, save

__all__ = ["CheckpointError", "convert", "export", "from_state_dict", "load", "save",
           "to_state_dict"]
