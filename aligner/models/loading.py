"""A run's models from its config: imported from Hugging Face or drawn at random, and frozen copies."""

from __future__ import annotations

from pathlib import Path

from megatron.core.models.gpt import GPTModel

from aligner.config import ConfigError, ModelSourceConfig
from aligner.models.config import ModelConfig
from aligner.models.gpt import build_model


def architecture_of(source: ModelSourceConfig) -> ModelConfig:
    """The architecture ``source`` describes: ``source.config``, or the ``config.json`` of ``source.hf_path``.

    ``source.params_dtype``, when set, overrides the dtype.

    Raises:
        ConfigError: neither or both of ``hf_path`` and ``config`` are set, ``hf_path`` is
            not a folder with a ``config.json``, or the config's values are invalid.
    """
    from aligner.models.hf import config_from_hf

    if (source.hf_path is None) == (source.config is None):
        raise ConfigError("set exactly one of model.hf_path (import a checkpoint) and model.config (random init)")
    if source.config is not None:
        values = dict(source.config)
    else:
        if not (Path(source.hf_path) / "config.json").is_file():
            what = "does not exist" if not Path(source.hf_path).exists() else "has no config.json"
            raise ConfigError(f"model.hf_path {source.hf_path} {what} (a local Hugging Face checkpoint folder)")
        from transformers import AutoConfig

        values = config_from_hf(AutoConfig.from_pretrained(source.hf_path, local_files_only=True)).to_dict()
    if source.params_dtype is not None:
        values["params_dtype"] = source.params_dtype
    try:
        return ModelConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model.config: {error}") from None


def build_model_from(source: ModelSourceConfig, num_value_outputs: int | None = None, tp: int = 1, pp: int = 1):
    """This rank's GPTModel shard: imported from ``source.hf_path`` or drawn from ``source.config``.

    Raises:
        ConfigError: see :func:`architecture_of`.
    """
    from aligner.models.hf import import_hf

    config = architecture_of(source)
    if source.config is not None:
        return build_model(config, num_value_outputs=num_value_outputs)
    return import_hf(source.hf_path, tp=tp, pp=pp, config=config, num_value_outputs=num_value_outputs)


def frozen_copy(model: GPTModel) -> GPTModel:
    """A frozen, eval-mode copy of ``model``'s current weights (a reference policy)."""
    reference = build_model(model.aligner_config, num_value_outputs=model.aligner_num_value_outputs, init_weights=False)
    reference.load_state_dict(model.state_dict())
    reference.requires_grad_(False)
    return reference.eval()


def check_vocab(tokenizer, model: GPTModel) -> None:
    """The model's vocabulary must cover every token id the tokenizer can produce.

    Raises:
        ConfigError: the tokenizer has more tokens than the model's ``vocab_size``.
    """
    vocab_size = model.aligner_config.vocab_size
    if len(tokenizer) > vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}; "
            "set model.config.vocab_size >= the tokenizer's size"
        )
