"""Write the demo's data and tokenizer: ``python -m aligner.recipes.prepare_demo --out .demo``.

Everything is generated here, nothing is downloaded: the synthetic arithmetic
tasks of :mod:`aligner.data.synthetic` for every record kind
(``<out>/data/<kind>/{train,val}.jsonl``) and a small byte-level BPE tokenizer
with a chat template trained on the same kind of text (``<out>/tokenizer``).
The tiny configs in ``configs/`` point at these paths.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aligner.data import build_tokenizer, write_demo_datasets


def prepare_demo(out_dir: str | Path, seed: int = 0, num_train: int = 512, num_val: int = 64) -> dict[str, Path]:
    """Write the demo datasets and tokenizer under ``out_dir``; returns their folders."""
    out = Path(out_dir)
    write_demo_datasets(out / "data", seed=seed, num_train=num_train, num_val=num_val)
    build_tokenizer(out / "tokenizer")
    return {"data": out / "data", "tokenizer": out / "tokenizer"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".demo", help="output folder (default .demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=512, help="training rows per kind")
    parser.add_argument("--num-val", type=int, default=64, help="validation rows per kind")
    args = parser.parse_args(argv)
    paths = prepare_demo(args.out, args.seed, args.num_train, args.num_val)
    print(f"wrote {paths['data']} and {paths['tokenizer']}")


if __name__ == "__main__":
    main()
