"""Scoring and submitting: metrics files, the leaderboard, submission CSVs and their RLE."""
