"""`eventgate bench`: eventgate's speed as ratios to baselines measured in the same run."""
