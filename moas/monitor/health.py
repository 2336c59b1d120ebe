"""Training health from the validation loss: a run that never learns, and a run that collapsed.

Both failures look the same on a loss curve read quickly: a flat line. The validation loss is measured at
fixed timesteps and noise (``moas.eval.validate``), so it is comparable across checkpoints, and
``loss_vs_zero`` scales it by the loss of a model that predicts zeros on the same inputs. Measured on the
CPU demo: a run whose learning rate was too high for its batch collapsed after ~500 steps to a flat loss it
never left (``moas.config.lr_batch_warning`` warns of that setting before the run; this sees the result).

* not learning: ``loss_vs_zero`` is still at least ``NOT_LEARNING`` at the second validation or later;
* collapsed: the loss rose to at least ``COLLAPSE`` × the best loss so far (the model learned, then lost it).

Each is warned once per run, and not learning not after a collapse (a log warning, which the console
shows); the caller decides what else to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NOT_LEARNING = 0.9  # loss_vs_zero at or above this: the predictions are barely better than zeros
COLLAPSE = 2.0  # validation loss at or above this × its best so far: the run lost what it had learned


@dataclass
class LossHealth:
    best: float | None = None
    best_epoch: int | None = None
    checks: int = 0
    warned: set[str] = field(default_factory=set)

    def check(self, epoch: int, loss: float | None, loss_vs_zero: float | None) -> str | None:
        """One sentence when this validation shows a failed run (each kind once), else None."""
        if loss is None:
            return None
        self.checks += 1
        message = None
        if self.best is not None and loss >= COLLAPSE * self.best and "collapsed" not in self.warned:
            self.warned.add("collapsed")
            message = (
                f"The validation loss rose from its best {self.best:.4g} (epoch {self.best_epoch}) to "
                f"{loss:.4g} at epoch {epoch}: training has collapsed. Resume from a checkpoint before the "
                "rise with a lower --lr (a rate too high for the batch is the usual cause)."
            )
        elif (
            loss_vs_zero is not None
            and self.checks >= 2
            and loss_vs_zero >= NOT_LEARNING
            and not self.warned  # after a collapse this is the same failure
        ):
            self.warned.add("not_learning")
            message = (
                f"At epoch {epoch} the validation loss is still {100 * loss_vs_zero:.0f} % of what a model "
                "that predicts nothing scores: training is not learning. Check the learning rate (--lr; "
                "too high for the batch or far too low) and that the images are not all alike."
            )
        if self.best is None or loss < self.best:
            self.best, self.best_epoch = loss, epoch
        return message
