"""Networks: the frame encoder, the pretext heads and the downstream heads."""
