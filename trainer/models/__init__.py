"""What the trainer learns: timm backbones (and the demo's ``small_cnn``), the projection head, the text tower."""
