"""nnU-Net's local logger with the semi-supervised loss terms added, saved and plotted.

nnU-Net's LocalLogger refuses keys it does not know; this subclass registers one key per loss term,
so the terms are logged per epoch, stored in (and restored from) checkpoints with the rest of the log,
and drawn in progress.png as a fourth panel under nnU-Net's three.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402

TERM_PREFIX = "train_"


class TermLogger(LocalLogger):
    def __init__(self, terms: Sequence[str], verbose: bool = False) -> None:
        super().__init__(verbose)
        self.terms = list(terms)
        for term in self.terms:
            self.my_fantastic_logging[TERM_PREFIX + term] = []

    def add_terms(self, terms: Sequence[str]) -> None:
        """Terms known only once the networks are built (e.g. one gradient norm per trained network)."""
        for term in terms:
            if term not in self.terms:
                self.terms.append(term)
                self.my_fantastic_logging[TERM_PREFIX + term] = []

    def load_checkpoint(self, checkpoint: dict) -> None:
        # a checkpoint from before a term existed still loads; the missing history is padded
        super().load_checkpoint(checkpoint)
        epochs = len(self.my_fantastic_logging.get("train_losses", []))
        for term in self.terms:
            self.my_fantastic_logging.setdefault(TERM_PREFIX + term, [float("nan")] * epochs)

    def plot_progress_png(self, output_folder: str) -> None:
        log = self.my_fantastic_logging
        epoch = min(len(v) for v in log.values())
        if epoch == 0:
            return
        x = list(range(epoch))
        fig, axes = plt.subplots(4, 1, figsize=(16, 26))
        ax = axes[0]
        ax.plot(x, log["train_losses"][:epoch], color="b", label="loss_tr (total)", linewidth=3)
        ax.plot(x, log["val_losses"][:epoch], color="r", label="loss_val", linewidth=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        twin = ax.twinx()
        twin.plot(x, log["mean_fg_dice"][:epoch], color="g", ls="dotted", label="pseudo dice", linewidth=2)
        twin.plot(x, log["ema_fg_dice"][:epoch], color="g", label="pseudo dice (mov. avg.)", linewidth=3)
        twin.set_ylabel("pseudo dice")
        ax.legend(loc="upper left")
        twin.legend(loc="upper right")

        ax = axes[1]
        durations = [e - s for e, s in zip(log["epoch_end_timestamps"][:epoch], log["epoch_start_timestamps"])]
        ax.plot(x, durations, color="b", label="epoch duration", linewidth=3)
        ax.set_ylim(0, max(durations) * 1.1 + 1e-6)
        ax.set_xlabel("epoch")
        ax.set_ylabel("time [s]")
        ax.legend(loc="upper left")

        ax = axes[2]
        ax.plot(x, log["lrs"][:epoch], color="b", label="learning rate", linewidth=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("learning rate")
        ax.legend(loc="upper left")

        ax = axes[3]
        for term in self.terms:
            ax.plot(x, log[TERM_PREFIX + term][:epoch], label=term, linewidth=2)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss term / weight")
        ax.set_title("semi-supervised terms (unweighted losses, and the unsupervised weight)")
        ax.legend(loc="upper left")

        fig.tight_layout()
        fig.savefig(f"{output_folder}/progress.png")
        plt.close(fig)
