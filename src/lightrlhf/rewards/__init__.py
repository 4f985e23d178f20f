"""What an online method optimises: a reward model and/or Python reward functions, shaped."""
