"""Session data: raw format, preparation into TFDS ArrayRecord, synthetic world, grain pipeline."""
