"""What both trainers share: config loading with --set, the optimizer, checkpoints and the loop."""
