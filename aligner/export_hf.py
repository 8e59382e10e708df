"""Export a saved checkpoint's language model as a Hugging Face checkpoint.

    python -m aligner.export_hf --checkpoint DIR --out DIR [--state NAME] [--tokenizer DIR] [--dtype bfloat16]

``--checkpoint`` is a checkpoint folder (``.../step_000123``) or a checkpoint
root (its ``latest`` is used), written by any recipe in any parallel layout.
Its ``config.yaml`` (the run's configuration) gives the architecture
(``model.config``, or ``model.hf_path``'s config.json), the source checkpoint
whose architecture class, token ids and dtype the export keeps
(``model.hf_path``) and the tokenizer saved with it (``data.tokenizer``, else
``model.hf_path``). One process, no GPU needed; the weights are read in
full. Value / reward models have no causal-LM layout and are refused.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aligner.console import UsageError, UserError

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aligner.export_hf",
        description="Write a saved checkpoint's language model as a Hugging Face checkpoint folder.",
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder (step_*) or a checkpoint root")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--state", default=None, help="the train state to export (default: the language model)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the run's)")
    parser.add_argument("--source", default=None, help="source Hugging Face folder (default: the run's model.hf_path)")
    parser.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="weights' dtype (default: the source's)")
    return parser


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder at ``path``: itself, or a root's ``latest``."""
    from aligner.checkpoint import latest_checkpoint
    from aligner.checkpoint.state import META

    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if (path / META).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise UserError(f"{path} is neither a checkpoint (no {META}) nor a checkpoint root with a 'latest'")
    return latest


def choose_state(meta: dict[str, Any], state: str | None, checkpoint: Path) -> str:
    """The train state to export: ``state``, else the checkpoint's only language model.

    Raises:
        UserError: an unknown state, a value model, or several language models and no ``state``.
    """
    states: dict[str, Any] = meta["states"]
    if state is not None:
        if state not in states:
            raise UserError(f"{checkpoint} has no train state {state!r} (it holds {sorted(states)})")
        outputs = states[state].get("value_outputs")
        if outputs is not None:
            raise UserError(
                f"train state {state!r} of {checkpoint} is a value/reward model ({outputs} outputs); "
                "a Hugging Face causal-LM export needs a language model"
            )
        return state
    language = sorted(name for name, info in states.items() if info.get("value_outputs") is None)
    if not language:
        raise UserError(
            f"{checkpoint} holds only value/reward models ({sorted(states)}); "
            "a Hugging Face causal-LM export needs a language model"
        )
    if len(language) > 1:
        raise UserError(f"{checkpoint} holds the language models {language}: choose one with --state")
    return language[0]


def _run_config(checkpoint: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from aligner.checkpoint.state import CONFIG

    path = checkpoint / CONFIG
    if not path.is_file():
        raise UserError(f"{checkpoint} has no {CONFIG} (the run's configuration), so its architecture is unknown")
    loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(loaded, dict) or not isinstance(loaded.get("model"), dict):
        raise UserError(f"{path} has no model section")
    return loaded


def _build(model_section: dict[str, Any]):
    """An untrained model of the run's architecture (weights are loaded over it)."""
    from aligner.config import ModelSourceConfig
    from aligner.models.gpt import build_model
    from aligner.models.loading import architecture_of

    source = ModelSourceConfig(
        hf_path=model_section.get("hf_path"),
        config=model_section.get("config"),
        params_dtype=model_section.get("params_dtype"),
    )
    return build_model(architecture_of(source), init_weights=False)


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    state: str | None = None,
    tokenizer: str | None = None,
    source: str | None = None,
    dtype: str | None = None,
) -> Path:
    """Export one language-model state of a saved checkpoint to ``out``; returns the checkpoint folder read.

    Needs an initialized 1-rank world (:func:`aligner.parallel.initialize`).
    """
    from aligner.checkpoint.state import META, load_model_weights
    from aligner.models.hf import export_hf

    path = resolve_checkpoint(checkpoint)
    meta = json.loads((path / META).read_text())
    name = choose_state(meta, state, path)
    run_config = _run_config(path)
    model_section = run_config["model"]
    data_section = run_config.get("data") if isinstance(run_config.get("data"), dict) else {}
    source = source or model_section.get("hf_path")
    if source is not None and not (Path(source) / "config.json").is_file():
        raise UserError(f"source {source} has no config.json; pass --source DIR (the imported checkpoint)")
    tokenizer = tokenizer or data_section.get("tokenizer") or model_section.get("hf_path")
    model = _build(model_section)
    load_model_weights(path, model, state_name=name)
    export_hf(model, out, source=source, tokenizer=tokenizer, dtype=dtype)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    from aligner.console import run_entry_point, setup_console_logging

    def entry() -> None:
        args = _parser().parse_args(argv)
        setup_console_logging(0)
        if Path(args.out).exists() and any(Path(args.out).iterdir()):
            raise UsageError(f"--out {args.out} exists and is not empty")
        from aligner.parallel import destroy, initialize

        initialize(tp=1, pp=1, backend="gloo")
        try:
            path = export_checkpoint(
                args.checkpoint,
                args.out,
                state=args.state,
                tokenizer=args.tokenizer,
                source=args.source,
                dtype=args.dtype,
            )
        finally:
            destroy()
        print(f"exported {path} -> {args.out}")

    run_entry_point(entry)


if __name__ == "__main__":
    main()
