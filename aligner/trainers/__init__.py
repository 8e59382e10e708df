"""Training loops: :class:`~aligner.trainers.offline.OfflineTrainer` for every offline algorithm."""
