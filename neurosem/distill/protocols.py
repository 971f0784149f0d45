"""Training schedules: SGD with momentum 0.9 and weight decay 5e-4, batch 64, the LR multiplied
by 0.1 at the milestones.

- ``paper``: lr 0.1, 100 epochs, milestones 50/75/90 (the paper, Sec. 3.1; it does not state the
  momentum, 0.9 is used as in CRD) -- SKD's default;
- ``crd``: lr 0.05 (0.01 for MobileNetV2, ShuffleV1, ShuffleV2), 240 epochs, milestones
  150/180/210 (RepDistiller's ``train_student.py``) -- every other method's default;
- ``iepkt``: lr 0.1, batch 128, 100 epochs (after IEPKT's GNN stage), lr x0.2 at 30/60/80,
  Nesterov momentum (IEPKT's ``train_w_distill.py``) -- IEPKT's default.
"""
from __future__ import annotations

from dataclasses import dataclass

from neurosem.errors import NeurosemError


@dataclass(frozen=True)
class Protocol:
    """SGD schedule: ``lr`` multiplied by ``lr_decay`` at each of ``milestones`` (epochs)."""

    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    epochs: int
    milestones: tuple[int, ...]
    lr_decay: float = 0.1
    nesterov: bool = False

    def scaled(self, epochs: int | None) -> "Protocol":
        """The same protocol over ``epochs`` epochs, milestones scaled proportionally."""
        if epochs is None or epochs == self.epochs:
            return self
        if epochs < 1:
            raise NeurosemError(f"--epochs must be at least 1, got {epochs}")
        ms = tuple(int(round(m * epochs / self.epochs)) for m in self.milestones)
        return Protocol(self.lr, self.momentum, self.weight_decay, self.batch_size, epochs, ms, self.lr_decay,
                        self.nesterov)


PROTOCOLS: dict[str, Protocol] = {
    "paper": Protocol(lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=64, epochs=100,
                      milestones=(50, 75, 90)),
    "crd": Protocol(lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=64, epochs=240,
                    milestones=(150, 180, 210)),
    # IEPKT's train_w_distill.py:29-37, 69, 209-216 (after its 20 GNN epochs: x0.2 at 30/60/80 of the 100
    # student epochs); Nesterov momentum 0.9 as the author's op_util.py (its IEPKT optimiser is missing)
    "iepkt": Protocol(lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=128, epochs=100,
                      milestones=(30, 60, 80), lr_decay=0.2, nesterov=True),
}


#: Students whose CRD learning rate is 0.01 (RepDistiller ``train_student.py``).
CRD_LR_001 = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


def default_protocol(method: str) -> str:
    """``paper`` for SKD (and its ablation), ``iepkt`` for IEPKT, ``crd`` for every other method
    (Table 1's baselines)."""
    if method in ("iepkt", "iepkt-bb"):
        return "iepkt"
    return "paper" if method in ("skd", "skd-random") else "crd"


def protocol_lr(protocol: str, student: str) -> float:
    """The protocol's learning rate; ``crd`` uses 0.01 for MobileNetV2 and the ShuffleNets."""
    return 0.01 if protocol == "crd" and student in CRD_LR_001 else PROTOCOLS[protocol].lr
