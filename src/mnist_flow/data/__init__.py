"""Datasets: sources (download, folder, npz, bundled sample), IDX parsing and validation, the split."""
