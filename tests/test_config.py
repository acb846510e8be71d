"""The run configuration: YAML + key=value overrides, round trip, and errors that name the key."""

from __future__ import annotations

import dataclasses
import pathlib
import typing

import pytest

from diffujax.config import (ConfigError, ModelSection, RunConfig, from_dict, load_config,
                             to_dict, to_yaml)
from diffujax.models import LlamaConfig
from diffujax.models.layers import REMAT_POLICIES
from diffujax.train.resume import check_resume

ROOT = pathlib.Path(__file__).resolve().parents[1]

YAML = """
output_dir: /tmp/run
model:
  init: {family: llama, vocab_size: 64, hidden_size: 32, num_layers: 2, num_heads: 4,
         num_kv_heads: 2, intermediate_size: 64}
diffusion:
  mask_token_id: 3
  anneal_steps: 100
optimizer:
  peak_lr: 3e-4          # YAML 1.1 reads this as a string; the loader accepts it as a number
  schedule: linear
mesh:
  shape: {data: 2, fsdp: -1, tensor: 2}
  rules: {embed: null, activation_batch: [data]}
checkpoint:
  async: false
"""


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(YAML)
    return p


def test_yaml_plus_overrides(path):
    cfg = load_config(path, ["optimizer.peak_lr=1e-3", "mesh.shape.fsdp=4", "train.steps=1e6",
                             "data.sources=[{path: a.parquet, weight: 0.7}]",
                             "diffusion.stratified_t=true", "optimizer.ema_decay=0.999"])
    assert isinstance(cfg, RunConfig) and cfg.output_dir == "/tmp/run"
    assert cfg.optimizer.peak_lr == 1e-3 and cfg.optimizer.schedule == "linear"
    assert cfg.mesh.shape.data == 2 and cfg.mesh.shape.fsdp == 4
    assert cfg.train.steps == 1_000_000 and isinstance(cfg.train.steps, int)
    assert cfg.data.sources == ({"path": "a.parquet", "weight": 0.7},)
    assert cfg.diffusion.stratified_t and cfg.optimizer.ema_decay == 0.999
    assert cfg.checkpoint.async_save is False
    rules = dict(cfg.mesh.rule_table())
    assert rules["embed"] is None and rules["activation_batch"] == ("data",)
    assert rules["mlp"] == "tensor"


def test_model_config_resolution(path):
    cfg = load_config(path, ["model.remat=full"])
    model = cfg.resolve_model_config()
    assert isinstance(model, LlamaConfig) and model.num_kv_heads == 2
    assert (model.dtype, model.param_dtype, model.remat, model.mask_token_id) == (
        "bfloat16", "float32", "full", 3)
    loaded = LlamaConfig(vocab_size=8, hidden_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                         intermediate_size=8, mask_token_id=5, dtype="float32")
    assert cfg.resolve_model_config(loaded).mask_token_id == 3  # the run's override wins


def test_round_trip(path):
    cfg = load_config(path, ["logging.profile_steps=[5, 8]"])
    again = path.parent / "again.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(again) == cfg
    assert "async: false" in to_yaml(cfg)


@pytest.mark.parametrize("override,message", [
    ("optimizer.lr_peak=1", "unknown config key 'optimizer.lr_peak' (did you mean"
                            " 'optimizer.peak_lr'?)"),
    ("mesh.shape.dat=2", "unknown config key 'mesh.shape.dat' (did you mean 'mesh.shape.data'?)"),
    ("model.init.hidden=3", "unknown config key 'model.init.hidden' (did you mean"
                            " 'model.init.hidden_size'?)"),
    ("trainn.steps=3", "unknown config key 'trainn' (did you mean 'train'?)"),
    ("mesh.rules.embedding=fsdp", "unknown logical axis 'mesh.rules.embedding'"),
])
def test_unknown_keys_are_named(path, override, message):
    with pytest.raises(ConfigError) as e:
        load_config(path, [override])
    assert message in str(e.value)


def test_an_unknown_key_is_named_before_what_it_left_unset():
    """A misspelt section leaves the real one at its defaults, which fail too (``model`` needs a
    checkpoint or an init); the error names the misspelling, the likelier cause."""
    with pytest.raises(ConfigError) as e:
        from_dict({"modle": {"checkpoint": "x"}})
    assert str(e.value) == "unknown config key 'modle' (did you mean 'model'?)"


@pytest.mark.parametrize("override,message", [
    ("optimizer.peak_lr=fast", "optimizer.peak_lr: expected a number, got str 'fast'"),
    ("train.steps=1.5", "train.steps: expected an integer, got float 1.5"),
    ("data.shuffle=1", "data.shuffle: expected a boolean"),
    ("diffusion.normalization=mean", "diffusion.normalization: 'mean' is not one of 'masked',"
                                     " 'tokens'"),
    ("model.init.num_layers=two", "model.init.num_layers: expected an integer"),
    ("mesh.distributed=maybe", "mesh.distributed: expected bool or 'auto'"),
    ("mesh.rules.embed=fsd", "mesh.rules.embed: 'fsd' must be null, a mesh axis"),
    # One array, one mesh axis twice: an error naming both logical axes, not a silent drop.
    ("mesh.rules.activation_embed=data", "mesh.rules: logical axes ('activation_batch',"
     " 'activation_length', 'activation_embed'): mesh axis 'data' is mapped from both"
     " 'activation_batch' and 'activation_embed'"),
    ("mesh.rules.head_dim=tensor", "mesh axis 'tensor' is mapped from both 'heads' and"
                                   " 'head_dim'"),
    ("mesh.shape.fsdp=0", "mesh.shape: axis sizes must be >= 1 or -1"),
    ("optimizer=3", "optimizer: expected a mapping, got int 3"),
    ("optimizer.grad_accum_steps=3", "optimizer.grad_accum_steps: (3) must divide"
                                     " data.global_batch (8)"),
    ("model.checkpoint=/ckpt", "model: set exactly one of 'model.checkpoint' and 'model.init'"),
    ("model.init.family=gpt3", "model.init.family: 'gpt3' is not one of"),
    ("model.init.family=[1]", "model.init.family: [1] is not one of"),
    ("train.steps=-1e3", "train.steps: -1000 must be > 0"),
    # The attention config (a plain dataclass of the attention layer) is read as strictly.
    ("model.attention.splash_block=true", "model.attention.splash_block: expected an integer,"
                                          " got bool True"),
    ("model.attention.tpu_block_sizes={block_qq: 8}", "unknown config key"
     " 'model.attention.tpu_block_sizes.block_qq' (did you mean"
     " 'model.attention.tpu_block_sizes.block_q'?)"),
    ("model.remat=dots_attention", "model.remat: 'dots_attention' is not one of 'none',"
                                   " 'dots_with_attention', 'dots' or 'full'"),
    ("model.loss_chunk=-8", "model.loss_chunk: -8 must be >= 0"),
    ("model.scan_layers=2", "model.scan_layers: expected a boolean (true/false), got int 2"),
])
def test_bad_values_are_named(path, override, message):
    with pytest.raises(ConfigError) as e:
        load_config(path, [override])
    assert message in str(e.value)


def test_a_section_changed_in_code_is_checked_again(path):
    cfg = load_config(path)
    with pytest.raises(ValueError, match="optimizer.decay_steps: must exceed warmup_steps"):
        dataclasses.replace(cfg.optimizer, warmup_steps=10, decay_steps=5)


@pytest.mark.parametrize("override,honoured", [
    ("mesh.shape.tensor=1", True),  # a key inside a section marked MAY_CHANGE
    ("model.attention.splash_block=1024", True),
    ("logging.wandb={project: p}", True),
    ("optimizer.b2=0.99", True),  # a field marked MAY_CHANGE
    ("optimizer.ema_decay=0.9", False),  # its unmarked sibling (the EMA weights' state)
    ("model.param_dtype=bfloat16", False),
    ("data.seq_len=64", False),
])
def test_a_resume_may_change_only_the_keys_marked_so(path, override, honoured):
    old, new = to_dict(load_config(path)), to_dict(load_config(path, [override]))
    if honoured:
        assert check_resume(old, new, 5, "run/5")
    else:
        with pytest.raises(ValueError, match="cannot resume run/5"):
            check_resume(old, new, 5, "run/5")


def test_bad_override_syntax(path):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(path, ["optimizer.peak_lr"])
    with pytest.raises(ConfigError, match="'output_dir' is not a section"):
        load_config(path, ["output_dir.x=1"])


def test_a_model_is_required():
    with pytest.raises(ConfigError, match="set exactly one of 'model.checkpoint'"):
        from_dict({})


@pytest.mark.parametrize("path", sorted([*(ROOT / "configs").glob("*.yaml"),
                                          *(ROOT / "diffujax" / "assets").glob("*.yaml")]),
                         ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


def test_a_config_file_in_a_bucket_reads_as_the_local_one(gcs):
    """``--config gs://...`` (reference: the same file loaded from disk); a missing object is
    one clear error naming it."""
    from diffujax import paths

    local = ROOT / "configs" / "tiny.yaml"
    url = gcs.url_for("configs") + "/tiny.yaml"
    paths.copy_file(local, url)
    overrides = ["train.steps=30", "optimizer.peak_lr=1e-4"]
    assert load_config(url, overrides) == load_config(str(local), overrides)
    with pytest.raises(ConfigError, match="missing.yaml: no such config file"):
        load_config(gcs.url_for("configs") + "/missing.yaml")
    with pytest.raises(ConfigError, match="missing.yaml: no such config file"):
        load_config(str(ROOT / "configs" / "missing.yaml"))


def test_model_remat_takes_the_models_policies():
    """``model.remat`` accepts exactly the policy names the layers' scan knows, in their order."""
    literal, none = typing.get_args(typing.get_type_hints(ModelSection)["remat"])
    assert none is type(None)
    assert typing.get_args(literal) == tuple(REMAT_POLICIES)
