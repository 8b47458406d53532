"""finetune: recover the pruned student's accuracy, distilling from the teacher when finetune.distill.

Unstructured masks stay fixed: a pruned weight stays zero.
"""

from kdprune import sharing, stage
from kdprune.params import load_params


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "data", "pruned", "soft_labels", "teacher", "out", "plots").parse_args(argv)
    p = load_params(args.params)
    import torch.nn.functional as F

    from kdprune import soft_labels, trainer
    from kdprune.checkpoints import load_model, load_tensors
    from kdprune.files import staged_dir
    from kdprune.data import labelled_subset, load_split
    from kdprune.pruning import apply_weight_masks, bake_weight_masks
    from kdprune.tracking import log_epoch, stage_run
    from kdprune.training import fit, resolve_device, seed_everything

    model, spec = load_model(args.pruned)
    if (args.pruned / "masks.pt").exists():
        apply_weight_masks(model, load_tensors(args.pruned / "masks.pt"))
    # the labels the student may see (student.label_fraction) are the labels fine-tuning may see
    if p.finetune.distill:
        soft_labels.check_provenance(args.soft_labels, args.teacher, args.data)
        train = soft_labels.load_train(args.data, args.soft_labels, p.student.label_fraction, p.seed)
        loss = soft_labels.loss(p.distill)
    else:
        x, y = load_split(args.data, "train")
        keep = labelled_subset(y, p.student.label_fraction, p.seed)
        train, loss = (x[keep], y[keep]), F.cross_entropy
    val = load_split(args.data, "val")
    seed_everything(p.seed)
    logged = stage.section(p, "finetune", "distill", "seed", "device", "student.label_fraction")
    with stage_run("finetune", logged, inputs=[args.data, args.pruned, args.soft_labels]) as run, \
            staged_dir(args.out) as out:
        history = fit(model, train, val, loss, p.finetune, p.seed, resolve_device(p.device), log_epoch)
        bake_weight_masks(model)
        trainer.save_trained(out, model.cpu(), spec, history, args.plots, run, val[0])


if __name__ == "__main__":
    stage.guard(sharing.once(main))
