"""Generate the deterministic toy captioned-image dataset (utils/data/toy.py) in the clip-pytorch JSON format.

    python datasets/make_toy.py --out datasets/toy --n-train 3000 --n-val 500
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.data.toy import main  # noqa: E402  (the repo root goes on the path first)

if __name__ == "__main__":
    main()
