"""The command line of brainage-bids."""
