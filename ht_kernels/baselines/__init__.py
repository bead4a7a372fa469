"""Baselines that hidden transfer is measured against."""
