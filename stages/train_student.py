"""train_student: the small student, distilled from the teacher's stored logits (Hinton KD loss)."""

from kdprune import stage
from kdprune.files import staged
from kdprune.params import load_params

READS = ("seed", "threads", "device", "augment", "student", "distill")


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "data", "soft_labels", "teacher", "out", "plots").parse_args(argv)
    p = load_params(args.params)
    inputs = {"data": args.data, "soft_labels": args.soft_labels, "teacher": args.teacher}
    outputs = {args.out: "folder", args.plots: "file"}
    with stage.run("train_student", p, READS, inputs, outputs) as run:
        from kdprune import recipes, soft_labels
        from kdprune.data import UNLABELLED, augmenter
        from kdprune.models import build_model
        from kdprune.training import fit, resolve_device

        soft_labels.check_made_from(args.soft_labels, run.inputs, args.teacher, args.data)
        meta, norm, (train, val) = recipes.load_data(args.data, "train", "val")
        train = soft_labels.attach(train, args.soft_labels, p.student.label_fraction, p.seed)
        run.log_epoch(0, {"labelled_samples": int((train.y != UNLABELLED).sum())})
        spec = p.student.spec(meta["in_channels"], meta["image_size"], meta["num_classes"])
        model = build_model(spec)
        history = fit(model, train, val, norm, soft_labels.loss(p.distill), p.student, p.seed,
                      resolve_device(p.device), run.log_epoch, l1=p.student.l1,
                      augment=augmenter(p.augment.crop, p.augment.flip), desc="student")
        with staged(outputs) as new:
            recipes.keep_model(new[args.out], model, spec, "student", val, norm, run)
            recipes.keep_curve(new[args.plots], history, run)
            run.seal(new[args.out])


if __name__ == "__main__":
    stage.guard(main)
