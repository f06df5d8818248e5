"""Episode generator and encoder for the lm2 demo model (issue 5). See episodes.py."""
