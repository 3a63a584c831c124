"""One file per adapter kind: its frozen config, its tensors and its math."""
