"""What a run leaves behind for people: a JSON-lines history, PNG curves and TensorBoard scalars."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from utils.data.pictures import ImagePipeline  # noqa: E402
from utils.eval.encode import evaluate  # noqa: E402
from utils.files import append_text, atomic_savefig, write_guard  # noqa: E402


class LossHistory:
    """One record per epoch in `history.jsonl`; curves redrawn from it, so a resumed run continues them.
    One record per step in `steps.jsonl`. Every write fails as one line naming the file (checkpoint.write_guard)."""

    def __init__(self, log_dir: str | Path, tensorboard: bool = True):
        self.log_dir = Path(log_dir)
        with write_guard(self.log_dir):
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / "history.jsonl"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_tensorboard_thread()
            with self._tensorboard():
                self.writer = SummaryWriter(str(self.log_dir))

    def _tensorboard(self):
        return write_guard(self.log_dir / "events.out.tfevents.*", "TensorBoard scalars")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, record: dict) -> None:
        append_text(self.path, json.dumps(record) + "\n")
        if self.writer is not None:
            with self._tensorboard():
                for key, value in record.items():
                    if key not in ("epoch", "step") and isinstance(value, (int, float)):
                        self.writer.add_scalar(key, value, record["epoch"])
                self.writer.flush()
        self.plot()

    def log_step(self, global_step: int, epoch: int, **scalars: float) -> None:
        """One line per step in `steps.jsonl`, and TensorBoard's step/ curves."""
        record = {"global_step": global_step, "epoch": epoch, **scalars}
        append_text(self.log_dir / "steps.jsonl", json.dumps(record) + "\n")
        if self.writer is not None:
            with self._tensorboard():
                for key, value in scalars.items():
                    self.writer.add_scalar(f"step/{key}", value, global_step)

    def plot(self) -> None:
        records = self.records()
        if not records:
            return
        epochs = [r["epoch"] for r in records]
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in (("loss", "train loss"), ("val_loss", "val loss")):
            if any(key in r for r in records):
                ax.plot([r["epoch"] for r in records if key in r], [r[key] for r in records if key in r],
                        marker="o", label=label)
        ax.set(xlabel="epoch", ylabel="loss", xlim=(min(epochs) - 0.5, max(epochs) + 0.5))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_savefig(fig, self.log_dir / "epoch_loss.png")
        evals = [r for r in records if "r_mean" in r]
        if evals:
            fig, ax = plt.subplots(figsize=(6, 4))
            for key in ("txt_r1", "img_r1", "r_mean"):
                ax.plot([r["epoch"] for r in evals], [r[key] for r in evals], marker="o", label=key)
            ax.set(xlabel="epoch", ylabel="recall (%)")
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            atomic_savefig(fig, self.log_dir / "epoch_recall.png")

    def close(self) -> None:
        if self.writer is not None:
            with self._tensorboard():
                self.writer.close()


def _quiet_tensorboard_thread() -> None:
    """TensorBoard writes from a thread, whose failure (a full disk) would print a traceback. The writer raises
    the same error again at its next add_scalar, flush or close, where write_guard makes it one line."""
    previous = threading.excepthook
    if getattr(previous, "quiet_tensorboard", False):
        return

    def hook(args) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)

    hook.quiet_tensorboard = True
    threading.excepthook = hook


class EvalCallback:
    """Recall@K on the validation set every `period` epochs, through the same code as eval.py: the image pipeline
    over the training model's image tower, in autocast to `dtype` (fp32 weights in mixed precision)."""

    def __init__(self, entries, root, transform: Callable, tokenizer: Callable, batch_size: int, num_workers: int,
                 device, dtype, period: int, enabled: bool = True, fast_decode: bool = True):
        self.entries, self.root, self.transform, self.tokenizer = entries, root, transform, tokenizer
        self.batch_size, self.threads, self.device, self.dtype = batch_size, num_workers, device, dtype
        self.fast_decode = fast_decode
        self.period, self.enabled = period, enabled and period > 0

    def due(self, epoch: int, last_epoch: int) -> bool:
        return self.enabled and (epoch % self.period == 0 or epoch == last_epoch)

    def __call__(self, model) -> dict[str, float]:
        pipeline = ImagePipeline(model.encode_image, self.transform, self.device, self.dtype, self.fast_decode)
        return evaluate(model, pipeline, self.entries, self.root, self.tokenizer, self.batch_size, self.threads)
