"""What every reader yields and the problems it collects on the way."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from utils.errors import UserError

SHOWN = 20
SPLIT_NAMES = {"train": "train", "restval": "train", "val": "val", "valid": "val", "dev": "val", "test": "test"}


class Record(NamedTuple):
    """One image and its captions. `image` is absolute; `split` is None where the layout has no split."""

    image: Path
    captions: list[str]
    split: str | None
    where: str  # file and line/row/record, for messages


@dataclass
class Problems:
    """Malformed input, each with where it is; raised together once a source is read."""

    items: list[str] = field(default_factory=list)
    empty_captions: int = 0
    uncaptioned: list[Path] = field(default_factory=list)  # folder source: images without a .txt

    def add(self, where: str, why: str) -> None:
        self.items.append(f"{where}: {why}")

    def report(self, what: str, skip: bool, switch: str = "skip_malformed") -> None:
        """Raise a UserError listing the malformed records, or (skip) print that list and go on without them."""
        if not self.items:
            return
        listing = "\n".join(f"  {item}" for item in self.items[:SHOWN])
        more = f"\n  ... and {len(self.items) - SHOWN} more" if len(self.items) > SHOWN else ""
        if not skip:
            raise UserError(f"{what}: {len(self.items)} malformed record(s):\n{listing}{more}\nFix them, or set "
                            f"{switch}=True to go on without them.")
        print(f"{what}: leaving out {len(self.items)} malformed record(s) ({switch}=True):\n{listing}{more}")


@dataclass
class Source:
    """What the user pointed the converter at."""

    input: Path
    images: Path  # where relative image names are resolved
    work_dir: Path  # where sources that embed images (cn-clip, wds) decode them to
    problems: Problems = field(default_factory=Problems)
    image_column: str = "filepath"
    caption_column: str = "title"
    separator: str = ""  # "" = by extension / sniffed

    def image_path(self, name: str, base: Path | None = None) -> Path:
        """A listed image name as a path: Windows backslashes are separators, relative names are under `base`."""
        relative = PurePosixPath(name.strip().replace("\\", "/"))
        return Path(relative) if relative.is_absolute() else (base or self.images) / relative

    def captions(self, texts: list, where: str) -> list[str]:
        """Non-empty captions, stripped; empty ones are dropped and counted, non-text ones are problems."""
        kept = []
        for text in texts:
            if not isinstance(text, str):
                self.problems.add(where, f"a caption must be text, got {str(text)[:60]!r}")
            elif text.strip():
                kept.append(" ".join(text.split()))
            else:
                self.problems.empty_captions += 1
        return kept


def split_name(raw: str, where: str, problems: Problems) -> str | None:
    name = SPLIT_NAMES.get(str(raw).strip().lower())
    if name is None:
        problems.add(where, f"unknown split {raw!r}; expected one of {', '.join(SPLIT_NAMES)}")
    return name
