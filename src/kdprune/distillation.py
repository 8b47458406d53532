"""Knowledge-distillation loss (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network")."""

import torch
import torch.nn.functional as F



def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            temperature: float, alpha: float, unlabelled: int = -1) -> torch.Tensor:
    """alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(s, y), both means over the batch.

    student_logits, teacher_logits: (B, K); targets: (B,) class indices, or `unlabelled` where a
    sample's hard label is withheld: the hard term then averages over the labelled samples only
    (and is 0 in a batch without any), while the soft term still sees every sample. The T^2
    factor keeps the soft term's gradient scale independent of T. As in the paper, the teacher's
    distribution is the target: KL(p_t || p_s), where the team's DESIGN.md writes KL(p_s || p_t).
    """
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)  # (B, K)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)  # (B, K)
    soft = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    labelled = targets != unlabelled  # (B,)
    ce = F.cross_entropy(student_logits, targets.clamp_min(0), reduction="none")  # (B,)
    hard = (ce * labelled).sum() / labelled.sum().clamp_min(1)
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard
