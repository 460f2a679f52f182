"""Tasks: one LightningModule per objective (loss, metrics, optimizer groups) around a plain model."""
