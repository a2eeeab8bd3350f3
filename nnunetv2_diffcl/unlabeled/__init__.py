"""Unlabeled cases at training time: preprocessed with the dataset's own plans, checked, and loaded beside the
labeled batch."""
