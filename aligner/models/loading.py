"""A run's models from its config: imported from Hugging Face or drawn at random, and frozen copies."""

from __future__ import annotations

from pathlib import Path

from megatron.core.models.gpt import GPTModel

from aligner.config import ConfigError, ModelSourceConfig
from aligner.models.config import ModelConfig
from aligner.models.gpt import build_model


def build_model_from(source: ModelSourceConfig, num_value_outputs: int | None = None, tp: int = 1, pp: int = 1):
    """This rank's GPTModel shard: imported from ``source.hf_path`` or drawn from ``source.config``.

    Raises:
        ConfigError: neither or both of ``hf_path`` and ``config`` are set, or
            ``hf_path`` is not a folder with a ``config.json``.
    """
    from aligner.models.hf import config_from_hf, import_hf

    if (source.hf_path is None) == (source.config is None):
        raise ConfigError("set exactly one of model.hf_path (import a checkpoint) and model.config (random init)")
    if source.config is not None:
        values = dict(source.config)
        if source.params_dtype is not None:
            values["params_dtype"] = source.params_dtype
        try:
            config = ModelConfig.from_dict(values)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"model.config: {error}") from None
        return build_model(config, num_value_outputs=num_value_outputs)
    if not (Path(source.hf_path) / "config.json").is_file():
        what = "does not exist" if not Path(source.hf_path).exists() else "has no config.json"
        raise ConfigError(f"model.hf_path {source.hf_path} {what} (a local Hugging Face checkpoint folder)")
    config = None
    if source.params_dtype is not None:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(source.hf_path, local_files_only=True)
        config = ModelConfig.from_dict({**config_from_hf(hf_config).to_dict(), "params_dtype": source.params_dtype})
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
