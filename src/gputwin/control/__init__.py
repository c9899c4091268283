"""Starting and steering trainers: the launcher, the per-arm supervisor, control requests."""
