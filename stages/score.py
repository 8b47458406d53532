"""score: the student's units and weights scored for importance by every method in score.methods.

With score.oracle, also the true loss increase of removing each unit alone, on score.oracle_samples
samples of score.oracle_split, and how well each method's ranking agrees with it. Train samples are
taken from the rows whose hard labels the students may see (student.label_fraction).
"""

from kdprune import stage
from kdprune.files import staged
from kdprune.params import load_params

READS = ("seed", "threads", "device", "score", "student.label_fraction")


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "data", "student", "out", "agreement", "plot").parse_args(argv)
    p = load_params(args.params)
    inputs = {"data": args.data, "student": args.student}
    outputs = {args.out: "folder", args.agreement: "file", args.plot: "file"}
    with stage.run("score", p, READS, inputs, outputs) as run:
        from kdprune import recipes, scoring, workers
        from kdprune.checkpoints import load_model
        from kdprune.data import labelled
        from kdprune.training import resolve_device

        names = list(dict.fromkeys(["train", p.score.oracle_split]))  # each split read once
        _, norm, splits = recipes.load_data(args.data, *names)
        train = labelled(splits[0], p.student.label_fraction, p.seed)
        held = train if p.score.oracle_split == "train" else splits[1]
        model, _ = load_model(args.student)
        device = resolve_device(p.device)
        model.to(device)
        scores, truth = scoring.score_all(model, train, norm, p.score, p.seed, held=held if p.score.oracle else None,
                                          processes=workers.count(device, p.threads))
        with staged(outputs) as new:
            scoring.save(new[args.out], scores, truth)
            agreement = scoring.report(scores, truth, new[args.agreement], new[args.plot])
            run.log_epoch(0, {f"spearman.{m}": v for m, v in agreement.items()})
            run.log_artifact(new[args.plot])
            run.seal(new[args.out])


if __name__ == "__main__":
    stage.guard(main)
