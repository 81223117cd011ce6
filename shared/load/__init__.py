"""`eventgate load`: a bounded load generator that sends producers' traffic to a front door."""
