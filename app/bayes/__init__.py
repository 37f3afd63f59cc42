"""Bayesian training helpers: what VOGN needs beyond the plain gradient (issue 12)."""
