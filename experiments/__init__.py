"""Experiments: grids of training runs over the capability suite, aggregated into a report (issue 7)."""
