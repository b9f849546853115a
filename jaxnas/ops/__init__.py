"""Building blocks shared by the search spaces: convolutions, pools, BN."""
