"""Training progress on the terminal (demo, benchmark): read from nnU-Net's output as it grows."""

from __future__ import annotations

import io
import sys

from nnunetv2_diffcl.benchmark import TrainingProgress, Workflow

NNUNET_EPOCH = """2026-12-04 19:08:23.671092: Epoch {epoch}
2026-12-04 19:08:23.672000: Current learning rate: 0.00982
2026-12-04 19:08:37.871092: train_loss {loss}
2026-12-04 19:08:37.871092: val_loss -0.1
2026-12-04 19:08:37.871092: Epoch time: {seconds} s
"""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_counts_epochs_loss_and_time_left(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("nnU-Net's banner\n")
    out = io.StringIO()
    progress = TrainingProgress(log, total_epochs=4, stream=out, interval=0.0)
    progress.update()
    assert out.getvalue() == ""  # no epoch finished yet: nothing to show
    with open(log, "a") as f:
        f.write(NNUNET_EPOCH.format(epoch=0, loss="-0.2500", seconds=10.0))
        f.write(NNUNET_EPOCH.format(epoch=1, loss="-0.5000", seconds=20.0) + "2026-12-04 19:0")  # a partial line
    progress.update()
    # 2 of 4 epochs done, mean epoch 15 s -> 30 s left; the half-written line is read later, not now
    assert out.getvalue() == "    epoch 2/4 [##########..........], loss -0.5000, ~30 s left\n"
    with open(log, "a") as f:
        f.write("8:50.0: Epoch 2\n")
    progress.update()
    assert progress.epoch == 2 and progress.done == 2


def test_progress_without_a_known_total_and_on_a_terminal(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(NNUNET_EPOCH.format(epoch=0, loss="1e-3", seconds=5.0))
    terminal = Terminal()
    progress = TrainingProgress(log, total_epochs=None, stream=terminal)
    progress.update()
    progress.update(final=True)
    assert terminal.getvalue() == "\r    epoch 1, loss 0.0010\n"  # one line, redrawn in place, closed at the end


def test_progress_on_a_log_file_is_sparse(tmp_path):
    log = tmp_path / "train.log"
    out = io.StringIO()
    progress = TrainingProgress(log, total_epochs=3, stream=out, interval=3600.0)
    for epoch in range(3):
        with open(log, "a") as f:
            f.write(NNUNET_EPOCH.format(epoch=epoch, loss="-0.1", seconds=1.0))
        progress.update()
    progress.update(final=True)
    assert out.getvalue().splitlines() == ["    epoch 3/3 [####################], loss -0.1000"]  # the final line only


def test_workflow_run_shows_progress_of_a_training(tmp_path, capsys):
    script = "".join(f"print({NNUNET_EPOCH.format(epoch=e, loss=-0.1 * e, seconds=0.1)!r}, flush=True)\n"
                     for e in range(2))
    flow = Workflow(tmp_path, {})
    flow.poll_seconds = 0.05
    flow.run("train_fake", [sys.executable, "-c", script], epochs=2)
    shown = capsys.readouterr().out
    assert "train_fake:" in shown and "epoch 2/2" in shown and "loss -0.1000" in shown
    assert (tmp_path / "logs" / "train_fake.log").read_text().count("Epoch time") == 2
