"""The model registry: versions with lineage, artifacts, the champion/challenger gate, migrations."""
