"""finetune: recover the pruned student's accuracy, distilling from the teacher when finetune.distill.

Unstructured masks stay fixed: a pruned weight stays zero.
"""

from kdprune import stage
from kdprune.files import staged
from kdprune.params import load_params

READS = ("seed", "threads", "device", "augment", "finetune", "distill", "student.label_fraction")


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "data", "pruned", "soft_labels", "teacher", "out", "plots").parse_args(argv)
    p = load_params(args.params)
    inputs = {"data": args.data, "pruned": args.pruned}
    if p.finetune.distill:
        inputs |= {"soft_labels": args.soft_labels, "teacher": args.teacher}
    outputs = {args.out: "folder", args.plots: "file"}
    with stage.run("finetune", p, READS, inputs, outputs) as run:
        import torch.nn.functional as F

        from kdprune import recipes, soft_labels
        from kdprune.checkpoints import load_model, load_tensors
        from kdprune.data import augmenter, labelled
        from kdprune.pruning import apply_weight_masks, bake_weight_masks
        from kdprune.recipes import MASKS_FILE
        from kdprune.training import fit, resolve_device

        meta, norm, (train, val) = recipes.load_data(args.data, "train", "val")
        model, spec = load_model(args.pruned)
        if (args.pruned / MASKS_FILE).exists():
            apply_weight_masks(model, load_tensors(args.pruned / MASKS_FILE))
        if p.finetune.distill:  # the labels the student may see (student.label_fraction) are the ones seen here
            soft_labels.check_made_from(args.soft_labels, run.inputs, args.teacher, args.data)
            train, loss = soft_labels.attach(train, args.soft_labels, p.student.label_fraction, p.seed), \
                soft_labels.loss(p.distill)
        else:
            train, loss = labelled(train, p.student.label_fraction, p.seed), F.cross_entropy
        history = fit(model, train, val, norm, loss, p.finetune, p.seed, resolve_device(p.device), run.log_epoch,
                      augment=augmenter(p.augment.crop, p.augment.flip), desc="finetune")
        bake_weight_masks(model)
        with staged(outputs) as new:
            recipes.keep_model(new[args.out], model, spec, "finetuned", val, norm, run)
            recipes.keep_curve(new[args.plots], history, run)
            run.seal(new[args.out])


if __name__ == "__main__":
    stage.guard(main)
