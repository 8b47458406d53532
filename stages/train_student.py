"""train_student: the small student, distilled from the teacher's stored logits (Hinton KD loss)."""

from kdprune import sharing, stage
from kdprune.params import load_params


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "data", "soft_labels", "teacher", "out", "plots").parse_args(argv)
    p = load_params(args.params)
    from kdprune import soft_labels, trainer
    from kdprune.files import staged_dir
    from kdprune.data import load_meta, load_split
    from kdprune.models import build_model
    from kdprune.tracking import log_epoch, stage_run
    from kdprune.training import fit, resolve_device, seed_everything

    soft_labels.check_provenance(args.soft_labels, args.teacher, args.data)
    spec = trainer.model_spec(p.student, load_meta(args.data))
    train = soft_labels.load_train(args.data, args.soft_labels, p.student.label_fraction, p.seed)
    val = load_split(args.data, "val")
    seed_everything(p.seed)
    model = build_model(spec)
    logged = stage.section(p, "student", "distill", "seed", "device")
    with stage_run("train_student", logged, inputs=[args.data, args.soft_labels]) as run, \
            staged_dir(args.out) as out:
        history = fit(model, train, val, soft_labels.loss(p.distill), p.student, p.seed, resolve_device(p.device),
                      log_epoch, l1=p.student.l1)
        trainer.save_trained(out, model.cpu(), spec, history, args.plots, run, val[0])


if __name__ == "__main__":
    stage.guard(sharing.once(main))
