"""Compliance review: ledger verification across parties and reports for reviewers."""
