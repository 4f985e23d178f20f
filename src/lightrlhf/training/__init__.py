"""What every stage uses around its own step: optimizer and schedule, gradient guard and clipping,
checkpoint filtering, reward-hacking tripwires, what is shown in TensorBoard."""
