"""train_teacher: train the teacher on hard labels, or adopt the user's own (teacher.weights)."""

from kdprune import stage
from kdprune.files import staged
from kdprune.params import load_params

READS = ("seed", "threads", "device", "augment", "teacher")


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "data", "out", "plots").parse_args(argv)
    p = load_params(args.params)
    inputs = {"data": args.data} | ({"weights": p.teacher.weights} if p.teacher.weights else {})
    outputs = {args.out: "folder", args.plots: "file"}
    with stage.run("train_teacher", p, READS, inputs, outputs) as run:
        import torch.nn.functional as F

        from kdprune import recipes, teacher
        from kdprune.data import augmenter
        from kdprune.models import build_model
        from kdprune.training import fit, resolve_device

        meta, norm, (train, val) = recipes.load_data(args.data, "train", "val")
        spec = p.teacher.spec(meta["in_channels"], meta["image_size"], meta["num_classes"])
        model = build_model(spec)
        if p.teacher.weights:
            history = teacher.adopt(model, p.teacher.weights, val, norm, resolve_device(p.device))
        else:
            history = fit(model, train, val, norm, F.cross_entropy, p.teacher, p.seed, resolve_device(p.device),
                          run.log_epoch, augment=augmenter(p.augment.crop, p.augment.flip), desc="teacher")
        with staged(outputs) as new:
            recipes.keep_model(new[args.out], model, spec, "teacher", val, norm, run)
            recipes.keep_curve(new[args.plots], history, run)
            run.seal(new[args.out])


if __name__ == "__main__":
    stage.guard(main)
