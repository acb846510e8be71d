"""The model families diffujax knows: adding one is a new family file and one line here."""

from __future__ import annotations

from diffujax.models import gpt2, llama, qwen2
from diffujax.models.configs import ConfigError, ModelConfig
from diffujax.models.family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (gpt2.FAMILY, llama.FAMILY, qwen2.FAMILY)}


def weight_axes() -> set[tuple[str, ...]]:
    """The logical axes of every weight of every family (what a rule table must shard)."""
    ones = dict(vocab_size=1, hidden_size=1, num_layers=1, num_heads=1, num_kv_heads=1,
                intermediate_size=1, tie_word_embeddings=False)
    return {spec.axes for f in FAMILIES.values()
            for spec in f.module.weight_table(f.config(**ones)).values()}


def family_of(config: ModelConfig) -> Family:
    return FAMILIES[config.family]


def config_from_hf(hf: dict, source: str = "config.json", **overrides) -> ModelConfig:
    """Pick the family from ``model_type`` (else ``architectures``) and build its config."""
    by_type = {t: f for f in FAMILIES.values() for t in f.hf_model_types}
    by_arch = {a: f for f in FAMILIES.values() for a in f.hf_architectures}
    model_type = hf.get("model_type")
    named = next((by_arch[a] for a in hf.get("architectures") or [] if a in by_arch), None)
    # A model_type we do not know names another architecture, whatever "architectures" says
    # (reading its weights as those of a known family would be silently wrong).
    family = named if model_type is None else by_type.get(model_type)
    if family is not None and named is not None and family is not named:
        raise ConfigError(f"{source}: model_type {model_type!r} contradicts architectures"
                          f" {hf.get('architectures')!r}")
    if family is None:
        raise ConfigError(
            f"{source}: unknown architecture (model_type={hf.get('model_type')!r}, "
            f"architectures={hf.get('architectures')!r}); supported model types:"
            f" {', '.join(by_type)}")
    try:
        return family.config.from_hf(hf, **overrides)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
