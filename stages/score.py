"""score: the student's units and weights scored for importance by every method in score.methods.

With score.oracle, also the true loss increase of removing each unit alone, on the whole of
score.oracle_split, and how well each method's ranking agrees with it (metrics/score.json).
"""

from kdprune import sharing, stage
from kdprune.params import load_params


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "data", "student", "out", "metrics", "plot").parse_args(argv)
    p = load_params(args.params)
    import torch.nn.functional as F

    from kdprune import importance
    from kdprune.checkpoints import load_model, save_tensors
    from kdprune.files import staged_dir, write_json
    from kdprune.data import batches, load_split
    from kdprune.report import plot_oracle
    from kdprune.tracking import log_epoch, stage_run, write_run_record

    model, _ = load_model(args.student)
    train = batches(*load_split(args.data, "train"), p.score.batch_size, p.score.samples, p.seed)
    held = batches(*load_split(args.data, p.score.oracle_split), p.score.batch_size)
    with stage_run("score", stage.section(p, "score", "seed"), inputs=[args.data, args.student]) as run, \
            staged_dir(args.out) as out:
        scores = {m: importance.SCORERS[m](model, train, F.cross_entropy, seed=p.seed, probes=p.score.probes)
                  for m in p.score.methods}
        for m, s in scores.items():
            save_tensors(out / f"{m}.pt", importance.to_tensors(s))
        metrics = {}
        if p.score.oracle:
            truth = importance.removal_loss_change(model, held, F.cross_entropy)
            save_tensors(out / "oracle.pt", truth)
            agree = {m: importance.agreement(s.units, truth) for m, s in scores.items()}
            metrics = {k: {m: a[k] for m, a in agree.items()} for k in ("spearman", "topk_overlap")}
            plot_oracle({m: s.units for m, s in scores.items()}, truth, args.plot)
        write_run_record(out, run)
        write_json(args.metrics, {"spearman_vs_oracle": metrics.get("spearman", {}),
                                  "topk_overlap": metrics.get("topk_overlap", {})})
        log_epoch(0, {f"{k}.{m}": v for k, d in metrics.items() for m, v in d.items()})


if __name__ == "__main__":
    stage.guard(sharing.once(main))
