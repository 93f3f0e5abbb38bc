"""Shared test setup: draw with matplotlib's non-interactive backend (no display on CI)."""

import os

os.environ["MPLBACKEND"] = "Agg"
