"""DINO's self-distillation loss (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021, Algorithm 1 and section 3.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.distributed import all_reduce_sum


class DINOLoss(nn.Module):
    """Cross-entropy between the teacher's centred, sharpened distribution of each global view
    and the student's distribution of every other view, averaged over those pairs.

    The teacher's outputs are centred by a running mean of themselves over the global batch
    (``center``, momentum ``center_momentum``; all ranks hold the same one) and sharpened by a
    low temperature; together the two keep the outputs from collapsing to one dimension
    (centring alone) or to the uniform distribution (sharpening alone). The centre is updated
    after the loss is computed, from this step's teacher outputs, as in the paper's code.

    Args:
        out_dim: K, the size of the heads' outputs (65,536 in the paper).
        student_temp: the student's temperature (0.1).
        center_momentum: the centre's momentum (0.9).
    Shapes:
        teacher (T, B, K): the teacher's outputs of the T global views;
        student (S, B, K): the student's of all S views, the same T global views first;
        -> a scalar. ``update_center`` False leaves the centre as it is (validation).
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self, teacher: torch.Tensor, student: torch.Tensor, teacher_temp: float, update_center: bool = True
    ) -> torch.Tensor:
        t, s = teacher.shape[0], student.shape[0]
        if t + s < 3 or t < 1:
            raise ValueError(f"DINO's loss needs two views or more, got {t} teacher and {s} student views")
        q = F.softmax((teacher.detach() - self.center) / teacher_temp, dim=-1)  # (T, B, K)
        log_p = F.log_softmax(student / self.student_temp, dim=-1)  # (S, B, K)
        # (T, S): the cross-entropy of each pair, averaged over the batch; a view is never
        # compared with itself (the diagonal of the global views).
        ce = -torch.einsum("tbk,sbk->ts", q, log_p) / teacher.shape[1]
        same = torch.eye(t, s, dtype=torch.bool, device=ce.device)
        loss = ce.masked_fill(same, 0.0).sum() / (t * s - min(t, s))
        if update_center:  # not in validation: the centre is the training batches' running mean
            self.update_center(teacher.detach())
        return loss

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        """center = m * center + (1 - m) * mean of the teacher's outputs (T, B, K) over every rank."""
        rows = teacher.flatten(0, 1)
        # The sum and the row count in one tensor: one collective per step, not two.
        summed = all_reduce_sum(torch.cat([rows.sum(0), rows.new_tensor([rows.shape[0]])]))
        mean = summed[:-1] / summed[-1]
        self.center.mul_(self.center_momentum).add_(mean.unsqueeze(0), alpha=1 - self.center_momentum)
