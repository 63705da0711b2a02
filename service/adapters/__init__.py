"""Ready-made reward functions for RLHF trainers (TRL, verl) that call a pal-rm server through service.client."""
