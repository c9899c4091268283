"""Reading a running experiment's files into core values (logs, folds, validations, liveness, GPU samples)."""
