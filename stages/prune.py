"""prune: remove the student's least important units (structured) or zero its weights (unstructured)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from kdprune import stage
from kdprune.params import Params, load_params

if TYPE_CHECKING:
    from torch import nn

    from kdprune.importance import Scores


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "data", "student", "scores", "out", "plot").parse_args(argv)
    p = load_params(args.params)
    from kdprune.checkpoints import load_model, load_tensors, save_model, save_tensors
    from kdprune.data import load_split
    from kdprune.errors import CheckpointError
    from kdprune.files import staged_dir
    from kdprune.importance import from_tensors
    from kdprune.models import count_params
    from kdprune.files import write_atomic
    from kdprune.pruning import FRACTIONS, ScoresMismatch, iterative_prune, sensitivity
    from kdprune.report import plot_sensitivity, sensitivity_csv
    from kdprune.tracking import log_artifact, log_epoch, stage_run, write_run_record
    from kdprune.training import evaluate

    model, spec = load_model(args.student)
    scores_file = args.scores / f"{p.prune.criterion}.pt"
    scores = from_tensors(load_tensors(scores_file))
    x_val, y_val = load_split(args.data, "val")
    accuracy = lambda m: evaluate(m, x_val, y_val)["accuracy"]  # noqa: E731
    before = accuracy(model)
    logged = stage.section(p, "prune", "seed", "device", "score.samples", "score.batch_size", "score.probes",
                           "student.label_fraction", "finetune.batch_size")
    with stage_run("prune", logged, inputs=[args.data, args.student, args.scores]) as run, \
            staged_dir(args.out) as out:
        try:
            curves = sensitivity(model, scores.units, accuracy)
            masks = iterative_prune(model, rescorer(p, args.data, scores), p.prune.amount, p.prune.steps,
                                    p.prune.scope, p.prune.structured, x_val[:1], recoverer(p, args.data), accuracy)
        except ScoresMismatch as e:
            raise CheckpointError(f"{scores_file}: {e}") from e
        write_atomic(out / "sensitivity.csv", sensitivity_csv(curves, FRACTIONS))
        plot_sensitivity(curves, FRACTIONS, args.plot)
        save_model(out, model, spec)
        if masks is not None:
            save_tensors(out / "masks.pt", masks)
        write_run_record(out, run)
        log_epoch(0, {"val_accuracy_before": before, "val_accuracy": accuracy(model), "params": count_params(model)})
        log_artifact(args.plot)


def rescorer(p: Params, data_dir: Path, first: Scores) -> Callable[[nn.Module], tuple[dict, dict]]:
    """The scores of round 1 are the score stage's; later rounds re-score the shrunken model the same way."""
    import torch.nn.functional as F

    from kdprune.data import batches, load_split
    from kdprune.importance import SCORERS

    rounds = 0

    def score(model: nn.Module) -> tuple[dict, dict]:
        nonlocal rounds
        rounds += 1
        if rounds == 1:
            return first.units, first.weights
        train = batches(*load_split(data_dir, "train"), p.score.batch_size, p.score.samples, p.seed + rounds)
        s = SCORERS[p.prune.criterion](model, train, F.cross_entropy, seed=p.seed, probes=p.score.probes)
        return s.units, s.weights
    return score


def recoverer(p: Params, data_dir: Path) -> Callable[[nn.Module], None]:
    """The short fine-tune between pruning rounds: hard labels the student may see, Adam at prune.round_lr."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from kdprune.data import labelled_subset, load_split
    from kdprune.training import fit, resolve_device

    rounds = SimpleNamespace(epochs=p.prune.round_epochs, batch_size=p.finetune.batch_size, optimizer="adam",
                             lr=p.prune.round_lr, weight_decay=0.0)

    def recover(model: nn.Module) -> None:
        (x, y), val = load_split(data_dir, "train"), load_split(data_dir, "val")
        keep = labelled_subset(y, p.student.label_fraction, p.seed)
        fit(model, (x[keep], y[keep]), val, F.cross_entropy, rounds, p.seed, resolve_device(p.device))
        model.cpu()
    return recover


if __name__ == "__main__":
    stage.guard(main)
