"""The leaderboard: markdown tables and plots built from a folder of stored results."""
