"""Training: mesh and sharding rules, flow matching, losses, optimizer, checkpoints, the loop."""
