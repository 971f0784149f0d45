"""Analysis of a run's semantic vectors: the KL metric of paper Fig. 4 (:mod:`.kl`), neighbour and
additive queries (:mod:`.query`) and the paper's figures (:mod:`.figures`, with the dissection's
masks from :mod:`.masks`, the map figures in :mod:`.maps`, the default units in :mod:`.defaults`,
all styled by :mod:`._plotstyle`). The commands that compute and draw (``neurosem kl``, ``neurosem
query``) are in :mod:`.commands`; imports go one way: ``_plotstyle`` <- ``kl``, ``query`` <-
``masks``, ``defaults``, ``maps`` <- ``figures`` <- ``commands``. Nothing heavy is imported here;
each module imports numpy/scipy/matplotlib/torch only when used.

Example:
    >>> from neurosem.analysis.query import query              # doctest: +SKIP
    >>> query("runs/resnet18", "layer4:312", add=["layer4:77"], k=3)   # doctest: +SKIP
"""
