"""torchrun entry points, one per algorithm: ``python -m aligner.recipes.<sft|rm|dpo|kto|steerlm> --config ...``.

Each reads a YAML config (``configs/``) with ``key=value`` overrides, builds the
model and data, and runs the shared offline trainer with its algorithm's
``forward_step``. :mod:`aligner.recipes.prepare_demo` writes the synthetic data
and tokenizer the tiny configs use.
"""
