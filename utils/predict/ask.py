"""The interactive loop of predict.py's predict and search modes."""
from __future__ import annotations

from typing import Callable


def ask_loop(prompt: str, handle: Callable[[str], str | None]) -> None:
    """Ask with `prompt` until an empty line, Ctrl-D or Ctrl-C; `handle` answers one input, or returns why it
    could not, and the loop asks again."""
    while True:
        try:
            text = input(prompt).strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not text:
            return
        if problem := handle(text):
            print(f"{problem}, try again")
