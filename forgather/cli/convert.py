"""`forgather convert SRC DST`: a Hugging Face Llama/Mistral/Qwen3 directory <-> a Forgather model directory.

The direction follows SRC: a Forgather model directory (its config.json has `model_tree`) converts to
Hugging Face format, anything else from it. DST must not exist (or be an empty directory) unless --overwrite;
it is written whole through a staging directory. Torch is imported only when the command runs. Errors the
user can fix (a model the family cannot express, an existing DST, a full disk) are one line, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="model directory to convert")
    parser.add_argument("dst", help="directory to write")
    parser.add_argument("--family", choices=("llama", "mistral", "qwen3"),
                        help="Hugging Face family to write (default: the one converted from, else inferred)")
    parser.add_argument("--name", help="name of the Forgather model package (default: the source's model_type)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast weights (default: keep)")
    parser.add_argument("--add-tokens", nargs="+", default=[], metavar="TOKEN", help="tokens to add to the vocabulary")
    parser.add_argument("--special", action="store_true", help="add the tokens as special tokens")
    parser.add_argument("--pad-vocab-to-multiple-of", type=int, default=1, metavar="N",
                        help="round a grown vocabulary up to a multiple of N (e.g. 64 for tensor cores)")
    parser.add_argument("--max-position-embeddings", type=int,
                        help="context length written to the Hugging Face config (default: recorded, else 2048)")
    parser.add_argument("--overwrite", "--force", action="store_true", help="replace DST if it exists")


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json; give a model directory")
    from forgather.convert.directory import is_forgather_directory
    from forgather.convert.hf import VocabOptions, forgather_to_hf, hf_to_forgather
    from forgather.convert.output import DestinationExists
    from forgather.convert.spec import ConversionError

    vocab = VocabOptions(args.add_tokens, args.special, args.pad_vocab_to_multiple_of)
    try:
        if is_forgather_directory(src):
            forgather_to_hf(src, dst, args.family, args.dtype, vocab, args.max_position_embeddings, args.overwrite)
            print(f"wrote Hugging Face model to {dst}")
        else:
            hf_to_forgather(src, dst, args.name, args.dtype, vocab, args.overwrite)
            print(f"wrote Forgather model to {dst}")
    except (ConversionError, DestinationExists, OSError) as error:  # OSError: disk full, no permission ...
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """`forgather convert ...`, errors reported as the `forgather` command reports them."""
    from forgather.cli.main import main as forgather_main

    return forgather_main(["convert", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
