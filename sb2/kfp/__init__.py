"""What the Kubeflow components call: the config they share, and the training launcher (one GPU, DDP or multi-node)."""
