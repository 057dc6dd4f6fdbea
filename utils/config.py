"""The command line of every script: `--name value` for each variable of the config block at its top.

A script's config is its module-level variables of plain types; each is a flag of the same name, parsed by
the type of its default, and `--help` lists them with the comment written above each in the script, so
the block stays the one place where settings are described. Every mistake is a UserError: one line on
stderr and exit status 2 through `run_script`, before any work starts.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import io
import os
import sys
import textwrap
import tokenize
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from utils.errors import UserError, run_main

_PLAIN = (bool, int, float, str, list, tuple, type(None))
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
_NONE = {"none", "null", "auto"}


def _number(test: Callable[[float], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and test(v)


_AT_LEAST_1 = (_number(lambda v: v >= 1), "at least 1")
_NOT_NEGATIVE = (_number(lambda v: v >= 0), "0 or more")
# Values the scripts share that a type alone does not rule out, checked after parsing (values edited into
# a config block too): {name: (test, what the value must be)}.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "batch_size": _AT_LEAST_1, "Epoch": _AT_LEAST_1, "save_period": _AT_LEAST_1, "eval_period": _AT_LEAST_1,
    "keep_states": _AT_LEAST_1, "max_bad_steps": _AT_LEAST_1, "top_k": _AT_LEAST_1, "Init_Epoch": _NOT_NEGATIVE,
    "stop_after_steps": _NOT_NEGATIVE, "train_samples_per_epoch": _NOT_NEGATIVE, "seed": _NOT_NEGATIVE, "grad_clip": _NOT_NEGATIVE,
    "weight_decay": _NOT_NEGATIVE, "Min_lr": _NOT_NEGATIVE, "Init_lr": (_number(lambda v: v > 0), "above 0"),
    "momentum": (_number(lambda v: 0 <= v < 1), "0 or more and below 1"),
    "port": (_number(lambda v: 1 <= v <= 65535), "a port number, 1 to 65535"),
    "warmup_ratio": (_number(lambda v: 0 <= v <= 1), "between 0 and 1"),
    "accum_freq": _AT_LEAST_1, "lora_r": _NOT_NEGATIVE, "lock_image_unlocked_groups": _NOT_NEGATIVE,
    "lock_text_unlocked_layers": _NOT_NEGATIVE, "lora_alpha": (_number(lambda v: v > 0), "above 0"),
    "lora_dropout": (_number(lambda v: 0 <= v < 1), "0 or more and below 1"),
    "coca_caption_loss_weight": _NOT_NEGATIVE, "coca_contrastive_loss_weight": _NOT_NEGATIVE,
    # WiSE-FT's blend weight: 0 is the start, 1 the fine-tuned weights; None (train.py) leaves them unblended.
    "wise_ft_alpha": (lambda v: v is None or _number(lambda a: 0 <= a <= 1)(v), "a number from 0 to 1"),
    "wise_ft_alphas": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                       and all(_number(lambda a: 0 <= a <= 1)(a) for a in v), "one or more numbers from 0 to 1"),
    "Cuda": (lambda v: v is None or isinstance(v, bool), "true, false or auto"),
    "freeze_bn_stats": (lambda v: v is None or isinstance(v, bool), "true, false or auto"),
    "num_workers": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                    "a whole number, 0 or more, or auto"),
}


def config_block(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The plain-typed, non-underscore module variables of a script: its config block."""
    return {k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, _PLAIN)}


def config_comments(source: str) -> dict[str, str]:
    """The comment above each top-level assignment of `source` (or at the end of its line).

    A variable with no comment of its own shares the one of the variable on the line just above it, so
    `# learning rates` over `Init_lr = ...` and `Min_lr = ...` describes both.
    """
    comment_lines: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comment_lines[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    comments: dict[str, str] = {}
    previous_end, previous_comment = -1, ""
    for node in ast.parse(source).body:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)):
            previous_end = -1
            continue
        above, line = [], node.lineno - 1
        while line >= 1 and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comment_lines.get(line, ""))
            line -= 1
        own = " ".join(filter(None, [*above, comment_lines.get(node.end_lineno, "")]))
        comment = own or (previous_comment if previous_end == node.lineno - 1 else "")
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            if isinstance(target, ast.Name):
                comments[target.id] = comment
        previous_end, previous_comment = node.end_lineno, comment
    return comments


def _parse_bool(text: str) -> bool:
    if text.lower() in _TRUE | _FALSE:
        return text.lower() in _TRUE
    raise argparse.ArgumentTypeError(f"expects true or false, got {text!r}")


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number, got {text!r}") from None


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a number, got {text!r}") from None


def _parse_open(text: str) -> Any:
    """A None default means "decide for me": none/auto keep it, true/false and numbers are read as such."""
    lowered = text.lower()
    if lowered in _NONE:
        return None
    if lowered in (_TRUE | _FALSE) - {"0", "1"}:  # here 0 and 1 are numbers (num_workers=0)
        return lowered in _TRUE
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


def _parser_for(default: Any) -> tuple[Callable[[str], Any], str]:
    """(parse one value, its metavar) by the type of a default."""
    if isinstance(default, bool):
        return _parse_bool, "true|false"
    if isinstance(default, int):
        return _parse_int, "INT"
    if isinstance(default, float):
        return _parse_float, "NUMBER"
    if default is None:
        return _parse_open, "VALUE|auto"
    return str, "TEXT"


def _check_rules(config: Mapping[str, Any]) -> None:
    for name, (ok, wanted) in RULES.items():
        if name in config and not ok(value := config[name]):
            raise UserError(f"--{name} must be {wanted}, got {value!r}")


# Variables whose None default stands for "decide for me", and what they take instead.
_OPEN_METAVARS = {"Cuda": "true|false|auto", "num_workers": "INT|auto", "precision": "fp32|fp16|bf16|auto",
                  "wise_ft_alpha": "0..1|none", "freeze_bn_stats": "true|false|auto"}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Wraps help at spaces only, so paths like bert-base-chinese stay whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake as a UserError (one line) instead of usage text and SystemExit."""

    def error(self, message: str):
        # argparse words errors as "argument --name: problem"; say "--name problem" instead.
        if message.startswith("argument "):
            flag, _, problem = message[len("argument "):].partition(": ")
            flag = flag.split("/")[-1]
            if problem.startswith("expected"):
                problem = "needs at least one value" if "at least" in problem else "needs a value"
            elif problem.startswith("ignored explicit argument"):
                problem = "takes no value"
            message = f"{flag} {problem}"
        raise UserError(message)


def _describe(default: Any) -> str:
    if isinstance(default, (list, tuple)):
        return " ".join(_describe(v) for v in default) or "(empty)"
    if isinstance(default, float):
        return f"{default:g}"
    return repr(default) if isinstance(default, str) else str(default)


def build_parser(config: Mapping[str, Any], comments: Mapping[str, str] | None = None, prog: str | None = None,
                 description: str = "") -> argparse.ArgumentParser:
    comments = comments or {}
    parser = _Parser(prog=prog, description=description, allow_abbrev=False, argument_default=argparse.SUPPRESS,
                     formatter_class=_Formatter,
                     usage=f"{prog or '%(prog)s'} [--name value ...]   (names below; --help shows this)",
                     epilog="Values: booleans true/false; list variables take several values (--captions \"a dog\" "
                            "\"a cat\"); variables whose default is None also take none/auto; --name=value works "
                            "too.")
    group = parser.add_argument_group("config variables (edit the block at the top of the script, or pass --name "
                                      "value)")
    for name, default in config.items():
        listed = isinstance(default, (list, tuple))
        parse, metavar = _parser_for((default[0] if default else "") if listed else default)
        metavar = _OPEN_METAVARS.get(name, metavar) if default is None else metavar
        # argparse %-formats help strings; a comment's own % signs stay as written.
        text = f"{comments.get(name, '')} [default: {_describe(default)}]".strip().replace("%", "%%")
        group.add_argument(f"--{name}", type=parse, metavar=metavar, help=text, **({"nargs": "+"} if listed else {}))
    return parser


def _join_negative_numbers(args: list[str], number_lists: frozenset[str] = frozenset()) -> list[str]:
    """`--Min_lr -1e-3` as `--Min_lr=-1e-3`: argparse takes "-1e-3" for an option (it knows "-1" and "-.5" only).

    The values of a list of numbers (`number_lists`) cannot be glued to their flag, which takes one value that
    way: there a leading space hides the minus sign from argparse, and int() and float() ignore the space."""
    out: list[str] = []
    in_list = False
    for arg in args:
        try:
            negative = arg.startswith("-") and float(arg) < 0
        except ValueError:
            negative = False
        if negative and in_list:
            out.append(f" {arg}")
        elif negative and out and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={arg}"
        else:
            if arg.startswith("-"):
                in_list = arg.lstrip("-") in number_lists
            out.append(arg)
    return out


def _unknown(argument: str, names: Sequence[str]) -> UserError:
    if not argument.startswith("-"):
        return UserError(f"unexpected {argument!r}: settings are written --name value (see --help)")
    name = argument.lstrip("-").partition("=")[0]
    by_case = [n for n in names if n.lower() == name.lower()]
    close = by_case or difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f"; did you mean --{close[0]}?" if close else "; --help lists them"
    return UserError(f"unknown option {argument.partition('=')[0]}{hint}")


def parse_overrides(config: Mapping[str, Any], argv: Sequence[str] | None = None,
                    comments: Mapping[str, str] | None = None, prog: str | None = None,
                    description: str = "") -> dict[str, Any]:
    """The command line's settings: only the variables it names, each parsed by its default's type.

    `--help` prints every variable with its default and comment and exits 0; a mistake raises UserError.
    """
    parser = build_parser(config, comments, prog, description)
    number_lists = frozenset(name for name, default in config.items() if isinstance(default, (list, tuple))
                             and default and isinstance(default[0], (int, float)) and not isinstance(default[0], bool))
    args = _join_negative_numbers(list(sys.argv[1:] if argv is None else argv), number_lists)
    given, unknown = parser.parse_known_args(args)
    if unknown:
        raise _unknown(unknown[0], list(config))
    overrides = vars(given)
    for name, value in overrides.items():
        if isinstance(config[name], tuple):
            overrides[name] = tuple(value)
    return overrides


def parse_config(namespace: Mapping[str, Any], argv: Sequence[str] | None = None) -> tuple[dict, dict]:
    """(config, explicit) for the script whose module globals are `namespace`: its config block with the
    command line applied, and the part the command line set."""
    defaults = config_block(namespace)
    script = Path(namespace.get("__file__") or "script.py")
    comments = config_comments(script.read_text(encoding="utf-8")) if script.is_file() else {}
    shown = Path(os.path.relpath(script)) if script.is_absolute() else script
    explicit = parse_overrides(defaults, argv, comments, prog=f"python {shown if '..' not in shown.parts else script.name}",
                               description=(namespace.get("__doc__") or "").strip())
    config = {**defaults, **explicit}
    _check_rules(config)
    return config, explicit


def run_script(namespace: Mapping[str, Any], main: Callable[[dict, dict], Any],
               argv: Sequence[str] | None = None) -> None:
    """Parse the command line and run `main(config, explicit)`, both inside the handler that turns a
    UserError into one line on stderr and exit status 2."""
    run_main(lambda: main(*parse_config(namespace, argv)))
