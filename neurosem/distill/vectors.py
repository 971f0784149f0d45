"""The teacher's vectors for SKD: read from an ``embedding.h5`` and checked against the student."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from neurosem.distill import zoo
from neurosem.errors import NeurosemError


def load_teacher_vectors(teacher_vectors: str | Path | None, teacher: str | None, student: str,
                         student_widths: Sequence[int]) -> tuple[list[torch.Tensor], list[str], Path]:
    """The teacher's S ``[C, K]`` per aligned layer, checked against the student's widths.

    ``teacher_vectors``: an ``embedding.h5`` or a run directory (default: ``runs/<teacher>``).
    Teacher layers: ``ALIGNED_LAYERS[teacher]``, or the embedding's layers when no teacher is named.
    Returns ``(vectors, teacher_layers, embedding_path)``.
    """
    from neurosem.embed import load_embedding
    from neurosem.run import RunDir, resolve_run

    s_layers = zoo.ALIGNED_LAYERS[student]
    if teacher_vectors is None:
        if teacher is None:
            raise NeurosemError("skd needs the teacher's vectors: pass --teacher-vectors (an embedding.h5 or "
                                "the teacher's run directory) or --teacher to use runs/<teacher>")
        teacher_vectors = resolve_run(None, model=teacher).path
    p = Path(teacher_vectors)
    path = p if p.suffix in (".h5", ".hdf5") or p.is_file() else RunDir(p).embedding
    t_layers_hint = ",".join(zoo.ALIGNED_LAYERS.get(teacher or "", [])) or "STAGE_ENDS"
    if not path.exists():
        raise NeurosemError(
            f"no teacher vectors at {path}: run `neurosem embed {teacher or 'TEACHER'} --weights TEACHER.pth "
            f"--data cifar100:ROOT --layers {t_layers_hint} --run {path.parent}` first, or pass --teacher-vectors")
    emb = load_embedding(path)
    made_by = str(emb.model or "").removeprefix("zoo:")
    if teacher is not None and made_by and made_by != teacher.removeprefix("zoo:"):
        raise NeurosemError(f"the vectors in {path} were made for {emb.model}, not the teacher {teacher}: "
                            f"pass the teacher's own embedding (`neurosem embed {teacher} ...`)")
    t_layers = list(zoo.ALIGNED_LAYERS[teacher]) if teacher in zoo.ALIGNED_LAYERS else list(emb.layers)
    if len(t_layers) != len(s_layers):
        raise NeurosemError(f"teacher layers {', '.join(t_layers)} and student {student} layers "
                            f"{', '.join(s_layers)} differ in number; SKD aligns them one to one")
    missing = [t for t in t_layers if t not in emb.layers]
    if missing:
        raise NeurosemError(f"{path} has no vectors for teacher layer(s) {', '.join(missing)} (it holds "
                            f"{', '.join(emb.layers)}); re-run `neurosem embed` with --layers {','.join(t_layers)}")
    vectors = []
    for t, s, width in zip(t_layers, s_layers, student_widths):
        v = torch.as_tensor(np.asarray(emb.vectors(t), dtype=np.float32))
        if v.shape[0] != width:
            raise NeurosemError(f"teacher layer {t} has {v.shape[0]} vectors but student layer {s} has "
                                f"{width} channels: SKD needs equal widths per aligned layer "
                                f"(e.g. resnet32x4 -> resnet8x4, wrn_40_2 -> wrn_16_2)")
        vectors.append(v)
    return vectors, t_layers, path
