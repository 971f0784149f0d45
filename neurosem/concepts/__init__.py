"""Concept vectors (Net2Vec; Gu & Tresp 2019): a vector per Broden concept in a layer's unit space,
global views of what a layer knows, and local explanations of one image (``explain``)."""
from neurosem.concepts.io import ConceptVectors, load_concepts
from neurosem.concepts.run import train_concepts

__all__ = ["ConceptVectors", "load_concepts", "train_concepts"]
