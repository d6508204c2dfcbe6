"""The serving programs: phoenix-rank and phoenix-retrieve."""
