"""Pure decision logic. Nothing here imports Ray; time and randomness are passed in."""
