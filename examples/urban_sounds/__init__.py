"""The urban-sounds siren example: a synthetic UrbanSound8K-like data set and its training."""
