"""The trainer's data path: sources (online, offline), the replay buffer and its policies, batches, image decoding."""
