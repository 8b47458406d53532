"""train_scratch: the student architecture trained on hard labels alone, the control for distillation.

It sees exactly the labelled subset the distilled student sees (student.label_fraction), cycled through
epochs as long as the student's: the same number of optimiser steps, and of scheduled learning rates.
"""

from kdprune import stage
from kdprune.files import staged
from kdprune.params import load_params

READS = ("seed", "threads", "device", "augment", "student")


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "data", "out", "plots").parse_args(argv)
    p = load_params(args.params)
    outputs = {args.out: "folder", args.plots: "file"}
    with stage.run("train_scratch", p, READS, inputs={"data": args.data}, outputs=outputs) as run:
        import torch.nn.functional as F

        from kdprune import recipes
        from kdprune.data import augmenter, cycled, labelled
        from kdprune.models import build_model
        from kdprune.training import fit, resolve_device

        meta, norm, (train, val) = recipes.load_data(args.data, "train", "val")
        labels = labelled(train, p.student.label_fraction, p.seed)
        run.log_epoch(0, {"labelled_samples": len(labels)})
        train = cycled(labels, len(train))
        spec = p.student.spec(meta["in_channels"], meta["image_size"], meta["num_classes"])
        model = build_model(spec)
        history = fit(model, train, val, norm, F.cross_entropy, p.student, p.seed, resolve_device(p.device),
                      run.log_epoch, l1=p.student.l1, augment=augmenter(p.augment.crop, p.augment.flip),
                      desc="scratch")
        with staged(outputs) as new:
            recipes.keep_model(new[args.out], model, spec, "student_scratch", val, norm, run)
            recipes.keep_curve(new[args.plots], history, run)
            run.seal(new[args.out])


if __name__ == "__main__":
    stage.guard(main)
