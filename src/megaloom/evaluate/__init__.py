"""Evaluation metrics, each named by its protocol and computed by the field's own library."""
