"""Probing classifiers over training: what each layer of each checkpoint encodes (see ``jaxlm.probe.study``)."""
