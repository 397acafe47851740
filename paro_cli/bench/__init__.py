"""Measurements behind `paro bench`: kernel speed against real baselines, end to end."""
