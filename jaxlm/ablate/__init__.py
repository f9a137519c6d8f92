"""Precision-ablation studies: a regime × layer-scaling × seed grid of ordinary runs, and a report."""
