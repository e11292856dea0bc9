"""The chaos suite: random real kills, storage faults, partitions and supervisor crashes."""
