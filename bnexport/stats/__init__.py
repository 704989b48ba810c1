"""Test-time statistics of BatchNorm layers: how far the running averages are from the data
(`inspect`)."""
