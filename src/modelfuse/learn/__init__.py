"""Merging coefficients learned from unlabeled data (AdaMerging)."""
