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


# Token files: the reference Forgather's --add-tokens takes one YAML file (vocab.read_token_file).
TOKEN_FILE_SUFFIXES = (".yaml", ".yml")


def positive_int(text: str) -> int:
    """An argparse type: a count or a length, which 0 or less would silently ignore or break."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of 1 or more expected")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The reference Forgather's names of these options are aliases, so that its documented command lines run:
    # --model-type, --max-length, -t (a chat template, not forgather's -t), --add-tokens FILE.yaml, --reverse.
    parser.add_argument("src", help="model directory to convert")
    parser.add_argument("dst", help="directory to write")
    parser.add_argument("--family", "--model-type", choices=("llama", "mistral", "qwen3"),
                        help="Hugging Face family to write (default: the one converted from, else inferred)")
    parser.add_argument("--name", help="name of the Forgather model package (default: the source's model_type)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast weights (default: keep)")
    parser.add_argument("--add-tokens", nargs="+", default=[], metavar="TOKEN",
                        help="tokens to add to the vocabulary, or one YAML file of them (the reference Forgather's: "
                             "bos_token/eos_token/pad_token/unk_token, special_tokens, regular_tokens)")
    parser.add_argument("--special", action="store_true", help="add the tokens as special tokens")
    parser.add_argument("--pad-vocab-to-multiple-of", type=positive_int, default=1, metavar="N",
                        help="round a grown vocabulary up to a multiple of N (e.g. 64 for tensor cores)")
    parser.add_argument("--max-position-embeddings", "--max-length", type=positive_int, metavar="N",
                        help="context length written to the converted config (default: the source's; a Forgather "
                             "model's recorded one, else 2048)")
    parser.add_argument("-t", "--chat-template-path", metavar="PATH", help="a Jinja chat template file for the tokenizer")
    parser.add_argument("--reverse", action="store_true",
                        help="require a Forgather SRC (to Hugging Face); the direction follows SRC anyway")
    parser.add_argument("--overwrite", "--force", action="store_true", help="replace DST if it exists")


def vocab_options(args: argparse.Namespace):
    """The tokenizer changes the command line asks for (forgather.convert.vocab.VocabOptions)."""
    from forgather.convert.vocab import VocabOptions, read_token_file

    tokens = list(args.add_tokens)
    if len(tokens) == 1 and tokens[0].endswith(TOKEN_FILE_SUFFIXES):
        vocab = read_token_file(tokens[0])
        if args.special:
            vocab.special_tokens, vocab.tokens = [*vocab.special_tokens, *vocab.tokens], []
    else:
        vocab = VocabOptions(tokens, args.special)
    vocab.pad_to_multiple_of = args.pad_vocab_to_multiple_of
    if args.chat_template_path:
        try:
            vocab.chat_template = Path(args.chat_template_path).expanduser().read_text()
        except FileNotFoundError:
            raise FileNotFoundError(f"-t {args.chat_template_path}: no such file; give a Jinja chat template file") from None
    return vocab


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.src).expanduser(), Path(args.dst).expanduser()
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json; give a model directory")
    from forgather.convert.directory import is_forgather_directory
    from forgather.convert.hf import forgather_to_hf, hf_to_forgather
    from forgather.convert.output import DestinationExists
    from forgather.convert.spec import ConversionError

    vocab = vocab_options(args)
    to_hf = is_forgather_directory(src)
    if args.reverse and not to_hf:
        raise ValueError(f"--reverse: {src} is not a Forgather model directory (its config.json has no model_tree); "
                         f"drop --reverse to convert it to Forgather")
    try:
        if to_hf:
            forgather_to_hf(src, dst, args.family, args.dtype, vocab, args.max_position_embeddings, args.overwrite)
            print(f"wrote Hugging Face model to {dst}")
        else:
            hf_to_forgather(src, dst, args.name, args.dtype, vocab, args.overwrite, args.max_position_embeddings)
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
