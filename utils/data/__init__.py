"""Data in: opening images and their preprocessing (`images`), caption-safe augmentation (`augment`), the
pre-flight pass over a dataset (`preflight`), and caption sets in other layouts and WebDataset shards (`sources/`)."""
