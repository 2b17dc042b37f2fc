"""Training of the small components some methods need (drafts, heads), on the target's outputs."""
