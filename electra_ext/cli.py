"""The `electra-ext` command.

    electra-ext pretrain [--config FILE.yaml|json] [--OPTION VALUE ...]   pre-train (torchrun for several GPUs)
    electra-ext train-tokenizer FILE... --output-dir DIR [--cased]        a WordPiece vocabulary for a corpus
    electra-ext plot RUN_DIR                                               (re)draw a run's PNG plots
"""
import argparse
import dataclasses
import os
import sys
import typing

from electra_ext.train.config import TrainConfig, read_config_file, with_saved_run_options
from electra_ext.train.loop import TrainingDiverged, pretrain


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_options(parser: argparse.ArgumentParser):
    """One --option per TrainConfig field, typed from its annotation, helped by its metadata. Options left
    out stay unset (None), so a config file's values show through."""
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        hint = hints[field.name]
        arguments = typing.get_args(hint)
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        # None/empty defaults are resolved from the preset and the machine, as the help text itself says.
        help_text = field.metadata["help"] + ("" if default in ((), None) else f" (default: {default})")
        if hint is bool:
            parser.add_argument(flag, type=parse_bool, nargs="?", const=True, default=None, help=help_text,
                                metavar="BOOL")
        elif field.name == "data":
            parser.add_argument(flag, nargs="+", default=None, help=help_text, metavar="PATH")
        elif field.name == "adam_betas":
            parser.add_argument(flag, nargs=2, type=float, default=None, help=help_text, metavar="BETA")
        else:
            value_type = next((a for a in arguments if a is not type(None)), hint) if arguments else hint
            parser.add_argument(flag, type=value_type, default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="electra-ext", description="Fast ELECTRA pre-training.")
    commands = parser.add_subparsers(dest="command", required=True)
    pretrain = commands.add_parser(
        "pretrain", help="pre-train ELECTRA (the embedded corpus by default)",
        description="Pre-trains an ELECTRA generator and discriminator. With no options: the embedded "
                    "public-domain corpus, the tiny model on CPU (about 4 minutes on 2 cores) or "
                    "ELECTRA-Small on a GPU. For several GPUs: torchrun --nproc-per-node N -m electra_ext.cli "
                    "pretrain ...")
    pretrain.add_argument("--config", help="YAML or JSON file of options; command-line options override it")
    add_config_options(pretrain)

    tokenizer = commands.add_parser("train-tokenizer", help="train a WordPiece vocabulary on a corpus")
    tokenizer.add_argument("files", nargs="+", help="text files (.txt/.gz/.xz) or directories of them")
    tokenizer.add_argument("--output-dir", required=True, help="where vocab.txt and tokenizer.json go")
    tokenizer.add_argument("--vocab-size", type=int, default=30522, help="entries (default: 30522, BERT's)")
    tokenizer.add_argument("--min-frequency", type=int, default=2, help="least count of a kept merge")
    tokenizer.add_argument("--cased", action="store_true",
                           help="keep case and accents (default: lower-case and strip accents, as BERT uncased); "
                                "the exports' tokenizers keep the choice")

    plot = commands.add_parser("plot", help="draw a run directory's loss and accuracy curves as PNG")
    plot.add_argument("run_dir")
    return parser


def main(argv=None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        if arguments.command == "pretrain":
            names = {field.name for field in dataclasses.fields(TrainConfig)}
            given = {name: value for name, value in vars(arguments).items() if name in names and value is not None}
            from_file = read_config_file(arguments.config) if arguments.config else {}
            config = TrainConfig.from_dict(with_saved_run_options({**from_file, **given}))
            run_dir = pretrain(config)
            if int(os.environ.get("RANK", "0")) == 0:  # once under torchrun
                print(f"run directory: {run_dir}")
        elif arguments.command == "train-tokenizer":
            from electra_ext.data.tokenizer import train_tokenizer

            print(train_tokenizer(arguments.files, arguments.output_dir, vocab_size=arguments.vocab_size,
                                  min_frequency=arguments.min_frequency, lowercase=not arguments.cased))
        elif arguments.command == "plot":
            from electra_ext.train.metrics import plot_run

            for path in plot_run(arguments.run_dir):
                print(path)
    except (ValueError, FileNotFoundError) as error:
        print(f"electra-ext {arguments.command}: error: {error}", file=sys.stderr)
        return 2
    except (TrainingDiverged, OSError) as error:  # a run that cannot go on: the message says what is kept
        print(f"electra-ext {arguments.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
