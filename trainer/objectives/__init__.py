"""What the trainer minimizes: the methods (StableRep, StableRep+, SimCLR, CLIP), their losses, cross-rank gathers."""
